#!/bin/sh
# buildroot post-image script: the flashable GPT image, with the same layout script that
# image/build uses (image/assemble-disk and image/genimage.cfg).
#   $1 = BINARIES_DIR, $2 = the board (BR2_ROOTFS_POST_SCRIPT_ARGS)
#
# systemd-boot comes from the build host (Debian: package systemd-boot-efi) or from
# SYSTEMD_BOOT_EFI: buildroot builds systemd-boot only together with systemd as init, and this
# appliance's init is its own /init.
set -eu
binaries=$1
board=$2
repo=$BR2_EXTERNAL_TANDEM_PATH/..

# genimage, mtools and dosfstools from buildroot's host dir come first on PATH.
PATH=$HOST_DIR/bin:$HOST_DIR/sbin:$PATH
export PATH
# One timestamp for every file on the image: buildroot's when BR2_REPRODUCIBLE is set.
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git -C "$repo" log -1 --format=%ct 2>/dev/null || echo 1704067200)}
export SOURCE_DATE_EPOCH

bash "$repo/image/assemble-disk" "$binaries/bzImage" "$binaries/rootfs.cpio.gz" \
	"$binaries/tandem-$board.img"
echo "tandem: $binaries/tandem-$board.img"
