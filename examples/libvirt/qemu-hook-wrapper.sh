#!/bin/sh
# /etc/libvirt/hooks/qemu calling clockcarry from an existing hook script.
#
# libvirt passes NAME OP SUBOP EXTRA and the domain XML on stdin, and reads
# stdout as replacement XML for "migrate begin" and "restore begin". This
# script keeps the XML in a variable, hands it to clockcarry (which prints
# nothing and exits 0 whatever happens to the resync), then runs your own
# logic with the same XML.
set -u
xml=$(cat)
printf '%s\n' "$xml" | /usr/local/bin/clockcarry libvirt hook "$@" >/dev/null

# ... your own hook logic here, reading "$xml" and "$@" ...

exit 0
