#!/usr/bin/env bash
# Pause and resume in place (docs/runbooks.md, "Pause and resume"): with
# the vm.clock extension the VMM touches no clock, the guest's TSC and
# kvm-clock count through the pause; nothing of clockcarry is needed.
#
#   API=/run/ch.sock PAUSE_S=2 examples/runbooks/pause-resume.sh
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
: "${API:?}"
api_ok "" "$API" PUT vm.pause
log "paused"
sleep "${PAUSE_S:-0}"
api_ok "" "$API" PUT vm.resume
check_running "" "$API"
log "resumed"
