#!/bin/sh
# kiln initramfs /init: load the few kernel modules needed to reach the root disk, mount it and hand over to
# /kiln/init on the real root. Runs under static busybox ash. The builder links only the applets this script
# uses into /bin (see INITRAMFS_APPLETS in crates/kiln-image/src/initramfs.rs): add any new one there.
# Modules are named /lib/modules/NN-name.ko so that the glob below yields them in dependency order.

fail() {
    # The host only sees the serial console, so say what went wrong there, then power off instead of
    # letting the kernel panic on init's exit: a clean poweroff makes QEMU exit promptly.
    echo "kiln-initramfs: $*" >/dev/console
    echo "kiln-initramfs: powering off" >/dev/console
    sync
    poweroff -f
    # Only reached if powering off is impossible; exiting would panic the kernel and reboot in a loop.
    while :; do sleep 3600; done
}

mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev || fail "cannot mount devtmpfs on /dev"
mount -t proc -o nosuid,nodev,noexec proc /proc || fail "cannot mount /proc"
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys || fail "cannot mount /sys"

for module in /lib/modules/*.ko; do
    [ -e "$module" ] || break
    insmod "$module" || fail "cannot load kernel module $module"
done

# The disk normally exists as soon as virtio_blk is loaded, but device probing may finish
# asynchronously; poll briefly (by uptime, since each sleep takes longer than asked under TCG).
read -r now _ </proc/uptime
deadline=$((${now%.*} + 3))
while [ ! -b /dev/vda ]; do
    read -r now _ </proc/uptime
    [ "${now%.*}" -ge "$deadline" ] && fail "root disk /dev/vda did not appear within 3s (is a virtio-blk device attached?)"
    sleep 0.01
done

mount -t ext4 -o rw,noatime /dev/vda /newroot || fail "cannot mount /dev/vda as ext4 on /newroot"
# Checked here because once switch_root has replaced this shell, a failure could only panic the kernel.
[ -x /newroot/kiln/init ] || fail "/kiln/init is missing or not executable in the root filesystem"
[ -x /newroot/kiln/busybox ] || fail "/kiln/busybox (which runs /kiln/init) is missing from the root filesystem"

# Hand the already-mounted API filesystems to the real root so /kiln/init does not remount them.
for fs in dev proc sys; do
    if [ -d "/newroot/$fs" ]; then
        mount --move "/$fs" "/newroot/$fs" || fail "cannot move /$fs into the root filesystem"
    else
        umount "/$fs"
    fi
done

exec switch_root /newroot /kiln/init
fail "switch_root to /kiln/init failed"
