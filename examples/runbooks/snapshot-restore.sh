#!/usr/bin/env bash
# Snapshot, and restore later (docs/runbooks.md, "Snapshot and restore").
#
#   VM=web-1 API=/run/ch.sock SNAPSHOT=file:///var/lib/snap/web-1 \
#   SIDECAR=/var/lib/clockcarry/web-1.json examples/runbooks/snapshot-restore.sh snapshot
#   ... later, API naming the VMM that restores it:
#   VM=web-1 API=/run/ch.sock SNAPSHOT=file:///var/lib/snap/web-1 \
#   SIDECAR=/var/lib/clockcarry/web-1.json examples/runbooks/snapshot-restore.sh restore
#
# After `snapshot` the VM is left paused (resume it, or shut it down, as
# the snapshot's purpose says).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
: "${VM:?}" "${API:?}" "${SNAPSHOT:?}" "${SIDECAR:?}"
key=()
[ -n "${KEY:-}" ] && key=(--key "$KEY")

case "${1:-}" in
    snapshot)
        log "1. clockcarry capture (the VM running), then pause and snapshot"
        "$CLOCKCARRY" capture --api-socket "$API" --vm "$VM" -o "$SIDECAR" "${key[@]}" -q \
            || die "capture failed: nothing was changed"
        api_ok "" "$API" PUT vm.pause
        api_ok "" "$API" PUT vm.snapshot "{\"destination_url\":\"$SNAPSHOT\"}"
        log "done: snapshot $SNAPSHOT, sidecar $SIDECAR; the VM is paused" ;;
    restore)
        log "1. restore the state, paused"
        api_ok "" "$API" PUT vm.restore "{\"source_url\":\"$SNAPSHOT\",\"resume\":false}"
        log "2. clockcarry restore"
        set +e
        "$CLOCKCARRY" restore --api-socket "$API" -i "$SIDECAR" --vm "$VM" "${key[@]}" \
            --max-elapsed "${MAX_ELAPSED:-30d}" -q
        code=$?
        set -e
        act_on_restore "$code" "" "$API"
        check_running "" "$API"
        log "done: $VM restored, its clock carried across the gap" ;;
    *) die "usage: $0 snapshot|restore" 2 ;;
esac
