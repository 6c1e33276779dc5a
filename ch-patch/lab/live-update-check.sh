# By-hand KVM lab check of a Cloud Hypervisor build with ch-patch (docs in
# ../README.md, "In the KVM lab"): a live update (unix:, local=true) by
# examples/runbooks/live-update.sh and a snapshot/restore with clockcarry
# restore --json, both under the default seccomp filter. Runs inside the lab:
#   bash /lab/live-update-check.sh NAME [RUN]   (binary: /lab/NAME/cloud-hypervisor)
set -u
V=$1
B=/lab/$V
W=/tmp/$V-${2:-1}
mkdir -p "$W"
cd "$W"
trap 'kill $(jobs -p) 2>/dev/null' EXIT
# api PREFIX SOCKET METHOD ENDPOINT [BODY], the runbooks' own.
. /lab/runbooks/lib.sh
# The destination VMM truncates the shared serial file while the source
# still writes at its own offset: merge both copies by (vCPU, sequence);
# the probe's fields are fixed-width lower-case hex, so a text sort orders them.
merge() {
    cat "$@" | tr -d '\000' | grep -a -m1 '^clockcarry-probe'
    cat "$@" | tr -d '\000' | grep -a '^CC ' | sort -u -k2,2 -k3,3
}
clockcarry-refvmm probe-elf --out "$W/probe.elf" || exit 1
start_vmm() { # name [args]
    local n=$1; shift
    "$B/cloud-hypervisor" -v --log-file "$W/$n.log" --api-socket "path=$W/$n.sock" "$@" &
    for _ in $(seq 200); do [ -S "$W/$n.sock" ] && return 0; sleep 0.05; done
    echo "CHLAB $V: $n did not come up"; return 1
}
echo "CHLAB $V: $($B/cloud-hypervisor --version | head -1), run ${2:-1}"

# 1. Live update (unix:, local=true), the runbook script.
start_vmm src --kernel "$W/probe.elf" --cpus boot=1 --memory size=64M,shared=on \
    --serial "file=$W/lu.serial" --console off || exit 1
start_vmm dst || exit 1
sleep 4
api "" "$W/src.sock" GET vm.clock > "$W/lu-src-clock.json"; echo >> "$W/lu-src-clock.json"
cp "$W/lu.serial" "$W/lu.serial.pre"
ms() { awk '{printf "%d", $1 * 1000}' /proc/uptime; }
t0=$(ms)
VM=probe SRC_API=$W/src.sock DST_API=$W/dst.sock MIGRATION_SOCKET=$W/mig.sock \
    SIDECAR=$W/lu.sidecar.json CLOCKCARRY=clockcarry bash /lab/runbooks/live-update.sh
rc=$?
t1=$(ms)
echo "CHLAB $V live-update: runbook exit $rc in $(( t1 - t0 )) ms"
sleep 3
echo "CHLAB $V live-update: src vm.clock before: $(cat $W/lu-src-clock.json)"
echo "CHLAB $V live-update: dst vm.clock after:  $(api "" $W/dst.sock GET vm.clock)"
echo "CHLAB $V live-update: dst vm.info state: $(api "" $W/dst.sock GET vm.info | grep -o '"state":"[A-Za-z]*"')"
echo "CHLAB $V live-update: src alive: $(kill -0 %1 2>/dev/null && echo yes || echo no)"
grep -i -h "seccomp\|sigsys\|bad system call\|error\|clock_guest\|CLOCK_GUEST" "$W/src.log" "$W/dst.log" | tail -12 | sed "s/^/CHLAB $V log: /"
merge "$W/lu.serial.pre" "$W/lu.serial" > "$W/lu.all"
clockcarry-refvmm analyze --json "$W/lu.all" | sed "s/^/CHLAB $V live-update analyze: /"
api "" "$W/dst.sock" PUT vmm.shutdown >/dev/null 2>&1; api "" "$W/src.sock" PUT vmm.shutdown >/dev/null 2>&1
sleep 1; kill %1 %2 2>/dev/null; wait 2>/dev/null

# 2. Snapshot / restore with clockcarry restore --json (the KVM_SET_CLOCK_GUEST warning).
rm -f "$W"/*.sock
start_vmm s1 --kernel "$W/probe.elf" --cpus boot=2 --memory size=64M \
    --serial "file=$W/sr.serial" --console off || exit 1
sleep 4
clockcarry capture --api-socket "$W/s1.sock" --vm probe -o "$W/sr.sidecar.json" -q
api "" "$W/s1.sock" PUT vm.pause
mkdir -p "$W/snap"
api "" "$W/s1.sock" PUT vm.snapshot "{\"destination_url\":\"file://$W/snap\"}"
api "" "$W/s1.sock" PUT vmm.shutdown; sleep 1; kill %1 2>/dev/null; wait 2>/dev/null
cp "$W/sr.serial" "$W/sr.serial.pre"
sleep 2
start_vmm s2 || exit 1
api "" "$W/s2.sock" PUT vm.restore "{\"source_url\":\"file://$W/snap\",\"resume\":false}"
clockcarry restore --api-socket "$W/s2.sock" --vm probe -i "$W/sr.sidecar.json" --json > "$W/sr.restore.json"
echo "CHLAB $V snapshot-restore: clockcarry restore exit $?"
echo "CHLAB $V snapshot-restore: report: $(tr -d '\n' < $W/sr.restore.json | head -c 6000)"
api "" "$W/s2.sock" PUT vm.resume
sleep 3
echo "CHLAB $V snapshot-restore: vm.clock after: $(api "" $W/s2.sock GET vm.clock)"
grep -i -h "clock_guest\|CLOCK_GUEST" "$W/s1.log" "$W/s2.log" | sed "s/^/CHLAB $V log: /"
merge "$W/sr.serial.pre" "$W/sr.serial" > "$W/sr.all"
clockcarry-refvmm analyze --json "$W/sr.all" | sed "s/^/CHLAB $V snapshot-restore analyze: /"
api "" "$W/s2.sock" PUT vmm.shutdown >/dev/null 2>&1; sleep 1; kill %1 2>/dev/null; wait 2>/dev/null
exit $rc
