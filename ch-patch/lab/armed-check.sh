# By-hand KVM lab check of the armed clock with a Cloud Hypervisor build of
# the whole series (patches 8 on: vm.restore / vm.receive-migration take a
# `clock`): a live update (unix:, local=true) and a snapshot/restore, each
# armed with `clockcarry arm` before the pause and applied by the VMM
# itself; then the same two with `clockcarry restore` inside the blackout,
# for comparison. Runs inside the lab:
#   bash /lab/armed-check.sh NAME [RUN]   (binary: /lab/NAME/cloud-hypervisor)
# Prints CHLAB lines: the VMM's answers, its "armed clock applied" log, the
# offsets before and after (a same-host plan copies them: equal bit for
# bit is 0 cycles of TSC error), and the probe's analysis of the blackout.
set -u
V=$1
B=/lab/$V
W=/tmp/$V-armed-${2:-1}
mkdir -p "$W"
cd "$W"
trap 'kill $(jobs -p) 2>/dev/null' EXIT
# api PREFIX SOCKET METHOD ENDPOINT [BODY], the runbooks' own.
. /lab/runbooks/lib.sh
API_TIMEOUT=120
# The destination VMM truncates the shared serial file while the source
# still writes at its own offset: merge both copies by (vCPU, sequence).
merge() {
    cat "$@" | tr -d '\000' | grep -a -m1 '^clockcarry-probe'
    cat "$@" | tr -d '\000' | grep -a '^CC ' | sort -u -k2,2 -k3,3
}
offsets() { # socket: the TSC offsets of GET vm.clock, one line
    api "" "$1" GET vm.clock | grep -o '"tsc_offset":-\?[0-9]*' | cut -d: -f2 | tr '\n' ' '
}
clockcarry-refvmm probe-elf --out "$W/probe.elf" || exit 1
start_vmm() { # name [args]
    local n=$1; shift
    "$B/cloud-hypervisor" -v --log-file "$W/$n.log" --api-socket "path=$W/$n.sock" "$@" &
    for _ in $(seq 200); do [ -S "$W/$n.sock" ] && return 0; sleep 0.05; done
    echo "CHLAB $V: $n did not come up"; return 1
}
stop_all() {
    for s in "$W"/*.sock; do api "" "$s" PUT vmm.shutdown >/dev/null 2>&1; done
    sleep 1; kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -f "$W"/*.sock
}
report() { # tag serial-files...: the probe's view of the blackout
    local tag=$1; shift
    merge "$@" > "$W/$tag.all"
    clockcarry-refvmm analyze --json "$W/$tag.all" | sed "s/^/CHLAB $V $tag analyze: /"
}
echo "CHLAB $V: $($B/cloud-hypervisor --version | head -1), run ${2:-1}"

# 1. Live update, armed (or, with MODE=restore, clockcarry restore inside).
live_update() { # mode: armed | restore
    local m=$1 tag=lu-$1
    start_vmm "$tag-src" --kernel "$W/probe.elf" --cpus boot=1 --memory size=64M,shared=on \
        --serial "file=$W/$tag.serial" --console off || return 1
    start_vmm "$tag-dst" || return 1
    sleep 4
    local src=$W/$tag-src.sock dst=$W/$tag-dst.sock mig=$W/$tag-mig.sock
    local before; before=$(offsets "$src")
    clockcarry capture --api-socket "$src" --vm probe -o "$W/$tag.sidecar.json" -q || return 1
    cp "$W/$tag.serial" "$W/$tag.serial.pre"
    if [ "$m" = armed ]; then
        clockcarry arm -i "$W/$tag.sidecar.json" --vm probe --for-receive "unix:$mig" \
            -o "$W/$tag.request.json" -q || return 1
        ( api "" "$dst" PUT vm.receive-migration "$(cat "$W/$tag.request.json")" \
            > "$W/$tag.answer"; echo "$API_CODE" > "$W/$tag.code" ) &
    else
        ( api "" "$dst" PUT vm.receive-migration \
            "{\"receiver_url\":\"unix:$mig\",\"resume\":false}" > "$W/$tag.answer"
          echo "$API_CODE" > "$W/$tag.code" ) &
    fi
    local receive=$!
    for _ in $(seq 100); do [ -S "$mig" ] && break; sleep 0.05; done
    api "" "$src" PUT vm.send-migration "{\"destination_url\":\"unix:$mig\",\"local\":true}" >/dev/null
    wait "$receive"
    echo "CHLAB $V $tag: receive-migration HTTP $(cat "$W/$tag.code"): $(head -c 2000 "$W/$tag.answer")"
    if [ "$m" = restore ]; then
        clockcarry restore --api-socket "$dst" --vm probe -i "$W/$tag.sidecar.json" -q
        echo "CHLAB $V $tag: clockcarry restore exit $?"
        api "" "$dst" PUT vm.resume >/dev/null
    fi
    sleep 3
    echo "CHLAB $V $tag: offsets before: $before after: $(offsets "$dst")"
    echo "CHLAB $V $tag: dst state: $(api "" "$dst" GET vm.info | grep -o '"state":"[A-Za-z]*"')"
    grep -a -h -i "armed clock\|error" "$W/$tag-dst.log" | tail -4 | sed "s/^/CHLAB $V $tag log: /"
    report "$tag" "$W/$tag.serial.pre" "$W/$tag.serial"
    stop_all
}

# 2. Snapshot / restore, armed right before vm.restore (or clockcarry restore).
snapshot_restore() { # mode
    local m=$1 tag=sr-$1
    start_vmm "$tag-1" --kernel "$W/probe.elf" --cpus boot=2 --memory size=64M \
        --serial "file=$W/$tag.serial" --console off || return 1
    sleep 4
    local s1=$W/$tag-1.sock
    local before; before=$(offsets "$s1")
    clockcarry capture --api-socket "$s1" --vm probe -o "$W/$tag.sidecar.json" -q || return 1
    api "" "$s1" PUT vm.pause >/dev/null
    mkdir -p "$W/$tag.snap"
    api "" "$s1" PUT vm.snapshot "{\"destination_url\":\"file://$W/$tag.snap\"}" >/dev/null
    api "" "$s1" PUT vmm.shutdown >/dev/null 2>&1; sleep 1
    cp "$W/$tag.serial" "$W/$tag.serial.pre"
    sleep 2
    start_vmm "$tag-2" || return 1
    local s2=$W/$tag-2.sock
    if [ "$m" = armed ]; then
        clockcarry arm -i "$W/$tag.sidecar.json" --vm probe --for-restore "file://$W/$tag.snap" \
            -o "$W/$tag.request.json" -q || return 1
        api "" "$s2" PUT vm.restore "$(cat "$W/$tag.request.json")" > "$W/$tag.answer"
        echo "CHLAB $V $tag: vm.restore HTTP $API_CODE: $(head -c 2000 "$W/$tag.answer")"
    else
        api "" "$s2" PUT vm.restore "{\"source_url\":\"file://$W/$tag.snap\",\"resume\":false}" >/dev/null
        clockcarry restore --api-socket "$s2" --vm probe -i "$W/$tag.sidecar.json" -q
        echo "CHLAB $V $tag: clockcarry restore exit $?"
        api "" "$s2" PUT vm.resume >/dev/null
    fi
    sleep 3
    echo "CHLAB $V $tag: offsets before: $before after: $(offsets "$s2")"
    grep -a -h -i "armed clock\|error" "$W/$tag-2.log" | tail -4 | sed "s/^/CHLAB $V $tag log: /"
    report "$tag" "$W/$tag.serial.pre" "$W/$tag.serial"
    stop_all
}

# 3. Refused: a body armed for this snapshot but gone stale (--valid-for
# 1ns): 400 naming arm.planned_tai_ns, the VM restored and paused.
refused() {
    local tag=sr-stale
    start_vmm "$tag-1" --kernel "$W/probe.elf" --cpus boot=1 --memory size=64M --console off \
        --serial "file=$W/$tag.serial" || return 1
    sleep 3
    local s1=$W/$tag-1.sock
    clockcarry capture --api-socket "$s1" --vm probe -o "$W/$tag.sidecar.json" -q || return 1
    api "" "$s1" PUT vm.pause >/dev/null
    mkdir -p "$W/$tag.snap"
    api "" "$s1" PUT vm.snapshot "{\"destination_url\":\"file://$W/$tag.snap\"}" >/dev/null
    api "" "$s1" PUT vmm.shutdown >/dev/null 2>&1; sleep 1
    start_vmm "$tag-2" || return 1
    clockcarry arm -i "$W/$tag.sidecar.json" --vm probe --for-restore "file://$W/$tag.snap" \
        --valid-for 1ns -o "$W/$tag.request.json" -q || return 1
    api "" "$W/$tag-2.sock" PUT vm.restore "$(cat "$W/$tag.request.json")" > "$W/$tag.answer"
    echo "CHLAB $V $tag: vm.restore HTTP $API_CODE: $(head -c 1000 "$W/$tag.answer")"
    echo "CHLAB $V $tag: state after: $(api "" "$W/$tag-2.sock" GET vm.info | grep -o '"state":"[A-Za-z]*"')"
    stop_all
}

live_update armed
live_update restore
snapshot_restore armed
snapshot_restore restore
refused
exit 0
