#!/usr/bin/env bash
# Live update on one host: the VM moves to a new VMM process over a Unix
# socket (docs/runbooks.md, "Live update on one host"). Same host, same
# boot: the captured offsets are copied bit for bit.
#
#   VM=web-1 SRC_API=/run/ch-old.sock DST_API=/run/ch-new.sock \
#   MIGRATION_SOCKET=/run/ch-mig.sock SIDECAR=/run/clockcarry/web-1.json \
#   examples/runbooks/live-update.sh
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
: "${VM:?}" "${SRC_API:?}" "${DST_API:?}" "${MIGRATION_SOCKET:?}" "${SIDECAR:?}"
key=()
[ -n "${KEY:-}" ] && key=(--key "$KEY")

log "1. clockcarry capture (the VM running)"
"$CLOCKCARRY" capture --api-socket "$SRC_API" --vm "$VM" -o "$SIDECAR" "${key[@]}" -q \
    || die "capture failed: nothing was changed"

log "2. receive (paused) on the new VMM, send from the old one"
( api_ok "" "$DST_API" PUT vm.receive-migration \
    "{\"receiver_url\":\"unix:$MIGRATION_SOCKET\",\"resume\":false}" ) &
receive=$!
for _ in $(seq 100); do [ -S "$MIGRATION_SOCKET" ] && break; sleep 0.05; done
api_ok "" "$SRC_API" PUT vm.send-migration \
    "{\"destination_url\":\"unix:$MIGRATION_SOCKET\",\"local\":true}"
wait "$receive" || die "receive-migration failed on the new VMM"

log "3. clockcarry restore"
set +e
"$CLOCKCARRY" restore --api-socket "$DST_API" -i "$SIDECAR" --vm "$VM" "${key[@]}" -q
code=$?
set -e
act_on_restore "$code" "" "$DST_API"
check_running "" "$DST_API"
log "done: $VM runs in the new VMM"
