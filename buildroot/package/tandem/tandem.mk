################################################################################
#
# tandem
#
################################################################################

# The sources are the repository this BR2_EXTERNAL tree lives in (buildroot/ is one of its
# directories), taken as they are: no download, no hash file.
TANDEM_VERSION = local
TANDEM_SITE = $(BR2_EXTERNAL_TANDEM_PATH)/..
TANDEM_SITE_METHOD = local
TANDEM_LICENSE = Apache-2.0
TANDEM_LICENSE_FILES =
# The crate with the binary; cargo finds the workspace (and its Cargo.lock) above it.
TANDEM_SUBDIR = firmware

# The workspace's .cargo/config.toml names the host triple as the build target; buildroot
# passes its own --target, and the binary is linked statically like image/build's (crt-static,
# paths remapped), so it runs in an initramfs without a loader.
TANDEM_CARGO_ENV = \
	RUSTFLAGS="-C target-feature=+crt-static --remap-path-prefix=$(@D)=/build/tandem"
TANDEM_CARGO_BUILD_OPTS = --bin tandem

$(eval $(cargo-package))
