# By-hand run of clockcarry-conformance against a Cloud Hypervisor build
# with ch-patch (docs/conformance.md, "Against Cloud Hypervisor"): boot the
# probe guest, pause, snapshot, restore it paused in a second VMM process,
# run the suite on that one. Default seccomp filter. Runs on any host with
# /dev/kvm, and inside the KVM lab, where TSC offsets are real and the
# suite's `offsets-move` check runs instead of skipping:
#   bash conformance.sh CH_DIR [CPUS]   (CH_DIR holds cloud-hypervisor and ch-remote;
#                                       clockcarry-refvmm and clockcarry-conformance on PATH)
set -u
B=$1
CPUS=${2:-2}
W=$(mktemp -d /tmp/ch-conformance.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null' EXIT
say() { echo "CHCONF: $*"; }
start_vmm() { # name [args]
    local n=$1; shift
    "$B/cloud-hypervisor" -v --log-file "$W/$n.log" --api-socket "path=$W/$n.sock" "$@" &
    for _ in $(seq 200); do [ -S "$W/$n.sock" ] && return 0; sleep 0.05; done
    say "$n did not come up"; return 1
}
remote() { "$B/ch-remote" --api-socket "$W/$1.sock" "${@:2}"; }

version=$("$B/cloud-hypervisor" --version 2>&1)
say "${version%%$'\n'*}, $CPUS vCPUs, work dir $W"
clockcarry-refvmm probe-elf --out "$W/probe.elf" || exit 1
start_vmm src --kernel "$W/probe.elf" --cpus "boot=$CPUS" --memory size=64M \
    --serial "file=$W/src.serial" --console off || exit 1
sleep 2
remote src pause || exit 1
mkdir -p "$W/snap"
remote src snapshot "file://$W/snap" || exit 1
remote src shutdown-vmm
wait %1 2>/dev/null
start_vmm dst || exit 1
remote dst restore "source_url=file://$W/snap,resume=false" || exit 1
clockcarry-conformance --api-socket "$W/dst.sock" --json | sed 's/^/CHCONF-JSON: /'
rc=${PIPESTATUS[0]}
grep -h -i "seccomp violation\|sigsys\|bad system call\|panicked" "$W/src.log" "$W/dst.log" | tail -5 | sed 's/^/CHCONF log: /'
remote dst shutdown-vmm 2>/dev/null
say "exit $rc"
exit "$rc"
