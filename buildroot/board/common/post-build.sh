#!/bin/sh
# buildroot post-build script: what image/build adds to the initramfs root besides the
# overlay (BR2_ROOTFS_OVERLAY): the board profile, the release file, ext4 tool names.
#   $1 = TARGET_DIR, $2 = the board (BR2_ROOTFS_POST_SCRIPT_ARGS)
set -eu
target=$1
board=$2
board_dir=$BR2_EXTERNAL_TANDEM_PATH/board/$board

install -D -m 0644 "$board_dir/board.conf" "$target/etc/tandem/board.conf"
printf 'TANDEM_BOARD=%s\nTANDEM_SOURCE=%s\nTANDEM_KERNEL=%s\n' "$board" "buildroot" \
	"$(ls "$target/lib/modules" 2>/dev/null | head -n 1)" >"$target/etc/tandem/release"
chmod 0755 "$target/init"
mkdir -p "$target/cfg" "$target/var/lib/tandem" "$target/run"
# buildroot's e2fsprogs installs mke2fs and e2fsck; /init and tandem use these names too.
for name in mkfs.ext4 mkfs.ext3 mkfs.ext2; do
	[ -e "$target/sbin/$name" ] || ln -sf mke2fs "$target/sbin/$name"
done
