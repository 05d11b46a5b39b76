#!/usr/bin/env bash
# Proves the README's two commands on a fresh Debian 12: builds a minimal bookworm root with
# debootstrap, clones this repository into it and runs ./scripts/test.sh and ./scripts/bench.sh
# there. Needs root, debootstrap and network access to a Debian mirror.
#   sudo ./scripts/fresh_debian_check.sh [ROOT_DIR]   (default /tmp/tpattn-debian12)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
root="${1:-/tmp/tpattn-debian12}"
mirror="${TPATTN_DEBIAN_MIRROR:-http://deb.debian.org/debian}"

[[ -d "$root/usr" ]] || debootstrap --variant=minbase bookworm "$root" "$mirror"
cp /etc/resolv.conf "$root/etc/resolv.conf"
rm -rf "$root/root/tpattn"
git clone -q "$repo" "$root/root/tpattn"
mount -t proc proc "$root/proc"
trap 'umount "$root/proc"' EXIT
chroot "$root" /bin/bash -c 'cd /root/tpattn && ./scripts/test.sh && ./scripts/bench.sh'
