#!/usr/bin/env bash
# Fetches what the QEMU guest test of the VFIO backend (tests/tests/vfio_guest.rs) needs
# into a cache folder, without installing QEMU system-wide (installing qemu-system-x86
# would replace this machine's own qemu-utils):
#   - apt-get download of qemu-system-x86, qemu-system-common, qemu-system-data,
#     seabios, busybox-static and the kernel image linux-image-amd64 points to,
#     unpacked with dpkg -x into $CACHE/root;
#   - apt-get install of the shared libraries QEMU 7.2 links against, when missing.
# Usage: tests/qemu/setup.sh [CACHE]   (default: $CTOFFLOAD_QEMU_CACHE or
#        ~/.cache/ctoffload-qemu). Idempotent: does nothing once $CACHE/ready exists.
# Needs root (apt-get install) and a Debian apt source with these packages (written
# against bookworm: QEMU 7.2, Linux 6.1).
set -euo pipefail
CACHE=${1:-${CTOFFLOAD_QEMU_CACHE:-$HOME/.cache/ctoffload-qemu}}
mkdir -p "$CACHE"
export DEBIAN_FRONTEND=noninteractive

libs=(libcapstone4 libfdt1 libpmem1 librdmacm1 libibverbs1 libslirp0 libvdeplug2)
missing=()
for l in "${libs[@]}"; do
  dpkg -s "$l" >/dev/null 2>&1 || missing+=("$l")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "qemu-setup: installing ${missing[*]}"
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }
fi

if [ -f "$CACHE/ready" ]; then
  exit 0
fi

kernel=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
if [ -z "$kernel" ]; then
  apt-get update -qq
  kernel=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
fi
[ -n "$kernel" ] || { echo "qemu-setup: no linux-image-amd64 in the apt sources" >&2; exit 1; }

rm -rf "$CACHE/debs" "$CACHE/root"
mkdir -p "$CACHE/debs" "$CACHE/root"
echo "qemu-setup: downloading QEMU, SeaBIOS, busybox and $kernel into $CACHE"
(
  cd "$CACHE/debs"
  # Downloaded as root into a folder _apt cannot write: silence that warning.
  apt-get download qemu-system-x86 qemu-system-common qemu-system-data seabios \
    busybox-static "$kernel" 2>&1 | grep -v -e 'unsandboxed' -e '^Get:' || true
)
for d in "$CACHE"/debs/*.deb; do
  dpkg -x "$d" "$CACHE/root"
done
rm -rf "$CACHE/debs"
# Keep only the kernel modules the guest loads (the rest is ~400 MB).
find "$CACHE/root/lib/modules" -name '*.ko*' ! -path '*/drivers/vfio/*' ! -name 'irqbypass.ko*' -delete
rm -rf "$CACHE/root/usr/share/doc" "$CACHE/root/usr/share/man"
"$CACHE/root/usr/bin/qemu-system-x86_64" --version | head -1
ls "$CACHE"/root/boot/vmlinuz-* >/dev/null
echo "$kernel" > "$CACHE/ready"
echo "qemu-setup: ready"
