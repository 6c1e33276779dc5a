#!/usr/bin/env bash
# Live migration across hosts over TCP, the inter-host offset measured and
# the sidecar carried by clockcarry itself (docs/runbooks.md, "Live
# migration across hosts").
#
#   VM=web-1 SRC_API=/run/ch.sock DST_API=/run/ch.sock \
#   PEER=dst.example:7487 PEER_LISTEN=0.0.0.0:7487 \
#   MIGRATION_LISTEN=tcp:0.0.0.0:6000 MIGRATION_URL=tcp:dst.example:6000 \
#   KEY=/etc/clockcarry/key RUN_DST='ssh root@dst.example' examples/runbooks/live-migration.sh
#
# Exit: 0 migrated, clock carried, resumed; otherwise restore's status with
# the VM left paused on the destination (lib.sh's table), or 1 when a step
# before it failed (the source VM is then still where it was).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
: "${VM:?}" "${SRC_API:?}" "${DST_API:?}" "${PEER:?}" "${PEER_LISTEN:?}"
: "${MIGRATION_LISTEN:?}" "${MIGRATION_URL:?}" "${KEY:?}"

log "1. destination: clockcarry serve (measures the offset, stores the sidecar)"
$RUN_DST "$CLOCKCARRY" serve --listen "$PEER_LISTEN" --key "$KEY" --once &
serve=$!
sleep "${SERVE_START_S:-0.3}"

log "2. source: clockcarry capture, offset measured, sidecar sent"
$RUN_SRC "$CLOCKCARRY" capture --api-socket "$SRC_API" --vm "$VM" --key "$KEY" \
    --peer "$PEER" --send-sidecar -q || die "capture failed: nothing was changed"
wait "$serve" || die "serve failed: nothing was changed"

log "3. destination: receive (paused), then source: send"
( api_ok "$RUN_DST" "$DST_API" PUT vm.receive-migration \
    "{\"receiver_url\":\"$MIGRATION_LISTEN\",\"resume\":false}" ) &
receive=$!
sleep "${RECEIVE_START_S:-0.3}"
api_ok "$RUN_SRC" "$SRC_API" PUT vm.send-migration "{\"destination_url\":\"$MIGRATION_URL\"}"
wait "$receive" || die "receive-migration failed on the destination"

log "4. destination: clockcarry restore"
set +e
$RUN_DST "$CLOCKCARRY" restore --api-socket "$DST_API" --vm "$VM" --key "$KEY" \
    --max-elapsed "${MAX_ELAPSED:-5m}" -q
code=$?
set -e
act_on_restore "$code" "$RUN_DST" "$DST_API"
check_running "$RUN_DST" "$DST_API"
log "done: $VM runs on the destination, its clock carried"
