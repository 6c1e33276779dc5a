# Shared by the runbook scripts: the VMM's HTTP API over its Unix socket
# (Cloud Hypervisor's, which the reference VMM speaks too), and the exit
# code decision table of `clockcarry restore` (docs/runbooks.md).
#
# RUN_SRC / RUN_DST: a command prefix that runs a command on the source /
# destination host (e.g. "ssh root@dst"); empty: this host. CLOCKCARRY:
# the clockcarry binary (default: clockcarry on PATH).

CLOCKCARRY=${CLOCKCARRY:-clockcarry}
RUN_SRC=${RUN_SRC:-}
RUN_DST=${RUN_DST:-}

log() { printf 'runbook: %s\n' "$*" >&2; }
die() { log "FAILED: $*"; exit "${2:-1}"; }

# api PREFIX SOCKET METHOD ENDPOINT [BODY]: prints the answer's body; the
# HTTP status goes to $API_STATUS's file. Fails on a transport error.
api() {
    local prefix=$1 socket=$2 method=$3 endpoint=$4 body=${5:-}
    local args=(-sS --max-time "${API_TIMEOUT:-60}" --unix-socket "$socket"
                -X "$method" -w '\n%{http_code}')
    [ -n "$body" ] && args+=(-H 'Content-Type: application/json' --data-binary "$body")
    local out
    out=$($prefix curl "${args[@]}" "http://localhost/api/v1/$endpoint") || return 1
    API_CODE=${out##*$'\n'}
    API_BODY=${out%$'\n'*}
    printf '%s' "$API_BODY"
}

# api_ok PREFIX SOCKET METHOD ENDPOINT [BODY]: as api, and a 2xx status.
api_ok() {
    api "$@" > /dev/null || die "$3 $4: no answer from $2"
    case "$API_CODE" in
        2??) ;;
        *) die "$3 $4 on $2: HTTP $API_CODE $API_BODY" ;;
    esac
}

# restore_decision EXIT: what a `clockcarry restore` exit status means for
# the VM: prints resume | leave-paused | escalate.
#   0 applied and verified             -> resume
#   9 applied, kvm-clock imprecise     -> resume (the bound says how far)
#   2 3 4 refused, nothing changed     -> leave-paused (or ON_FAILURE=vmm-default: resume)
#   5 rolled back, nothing changed     -> leave-paused (or ON_FAILURE=vmm-default: resume)
#   8 busy (another run on this VM)    -> leave-paused: that run decides
#   6 or anything else: state unknown  -> escalate: never resume
restore_decision() {
    case "$1" in
        0|9) echo resume ;;
        2|3|4|5)
            if [ "${ON_FAILURE:-abort}" = vmm-default ]; then echo resume; else echo leave-paused; fi ;;
        8) echo leave-paused ;;
        *) echo escalate ;;
    esac
}

# act_on_restore EXIT PREFIX SOCKET: resumes the VM, or not, per the table;
# the script's exit status is restore's when the VM is not resumed.
act_on_restore() {
    local code=$1 prefix=$2 socket=$3
    case "$(restore_decision "$code")" in
        resume)
            [ "$code" = 0 ] || log "clockcarry restore exited $code: resuming as the table says"
            api_ok "$prefix" "$socket" PUT vm.resume
            log "resumed" ;;
        leave-paused)
            log "clockcarry restore exited $code: the VM is left PAUSED (see its next: line)"
            exit "$code" ;;
        escalate)
            log "clockcarry restore exited $code: clock state UNKNOWN: do NOT resume; escalate"
            exit "$code" ;;
    esac
}

# running PREFIX SOCKET: the VM answers vm.clock as Running.
check_running() {
    local state
    state=$(api "$1" "$2" GET vm.clock | sed -n 's/.*"state":"\([A-Za-z]*\)".*/\1/p')
    [ "$state" = Running ] || die "after the resume the VM is ${state:-unknown}, not Running"
}
