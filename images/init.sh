#!/kiln/busybox sh
# kiln guest init, installed as /kiln/init and started as PID 1 by the initramfs (switch_root).
#
# It prepares the minimum a sandbox needs (API filesystems, hostname, static network, DNS), starts the
# kiln agent under a restart loop and then stays around to reap orphaned processes. It is shared by every
# image and runs under the static busybox the builder installs as /kiln/busybox, whatever else the image
# has. That busybox prefers its own applets, so `mount`, `ip`, `ln`... below are busybox's even in a Debian
# image, and most run without an exec (cheap under TCG). Boot time matters: prefer shell builtins and
# redirections over extra processes.
#
# Kernel command line parameters (all optional):
#   kiln.hostname=NAME   hostname (default: kiln)
#   kiln.ip=ADDR/PREFIX  address of eth0 (default: 10.0.2.15/24, QEMU user networking)
#   kiln.gw=ADDR         default gateway (default: 10.0.2.2)
#   kiln.dns=A[,B...]    nameservers for /etc/resolv.conf (default: 10.0.2.3)
#   kiln.resize=1        grow the root ext4 to the size of the disk (needs resize2fs in the image)
#   kiln.debug=1         print network, mounts and timing details to the console

export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8 TERM=linux
umask 022

say() { echo "kiln-init: $*" >/dev/console; }

# With kiln.debug=1, print the guest uptime at each step to see where boot time goes.
mark() {
    [ "$debug" = 1 ] || return 0
    read -r up _idle </proc/uptime
    say "debug: ${up}s $1"
}

mounted() {
    # Reading /proc/mounts with `read` avoids spawning grep for every check.
    while read -r _dev mnt _rest; do
        [ "$mnt" = "$1" ] && return 0
    done </proc/mounts
    return 1
}

mount_api_filesystems() {
    # The initramfs normally hands over /dev, /proc and /sys already mounted; mount them only if not.
    [ -e /proc/self ] || /kiln/busybox mount -t proc -o nosuid,nodev,noexec proc /proc
    [ -e /sys/kernel ] || mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
    [ -e /dev/null ] || mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev
    mkdir -p /dev/pts /dev/shm
    mounted /dev/pts || mount -t devpts -o nosuid,noexec,gid=5,mode=620,ptmxmode=000 devpts /dev/pts
    mounted /dev/shm || mount -t tmpfs -o nosuid,nodev,mode=1777 shm /dev/shm
    mounted /tmp || mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /tmp
    mounted /run || mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs /run
}

load_late_modules() {
    # Modules no boot step needs (overlay, vsock) are loaded after the agent starts; see LATE_MODULES in
    # crates/kiln-image/src/modules.rs.
    for module in /kiln/modules/*.ko; do
        [ -e "$module" ] || return 0
        insmod "$module" || say "cannot load kernel module $module"
    done
}

link_std_fds() {
    # udev would normally create these; shells need /dev/fd for process substitution. Not needed by the
    # agent itself, so this runs after it has started.
    [ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd
    [ -e /dev/stdin ] || ln -s /proc/self/fd/0 /dev/stdin
    [ -e /dev/stdout ] || ln -s /proc/self/fd/1 /dev/stdout
    [ -e /dev/stderr ] || ln -s /proc/self/fd/2 /dev/stderr
}

parse_cmdline() {
    hostname=kiln ip=10.0.2.15/24 gw=10.0.2.2 dns=10.0.2.3 resize=0 debug=0
    read -r cmdline </proc/cmdline
    for arg in $cmdline; do
        case "$arg" in
            kiln.hostname=*) hostname=${arg#kiln.hostname=} ;;
            kiln.ip=*) ip=${arg#kiln.ip=} ;;
            kiln.gw=*) gw=${arg#kiln.gw=} ;;
            kiln.dns=*) dns=${arg#kiln.dns=} ;;
            kiln.resize=*) resize=${arg#kiln.resize=} ;;
            kiln.debug=*) debug=${arg#kiln.debug=} ;;
        esac
    done
}

setup_hostname() {
    echo "$hostname" >/proc/sys/kernel/hostname
    # Tools such as sudo resolve the local hostname; keep it resolvable without DNS. /etc may be
    # read-only in a custom image, which is not worth failing the boot for.
    {
        echo "127.0.0.1 localhost"
        echo "127.0.1.1 $hostname"
        echo "::1 localhost ip6-localhost ip6-loopback"
    } >/etc/hosts 2>/dev/null
    echo "$hostname" >/etc/hostname 2>/dev/null
}

setup_identity_files() {
    # kiln gives every resumed copy and fork child its own hostname and machine id while it resumes.
    # Rewriting these two files on the root ext4 was the slowest step of a resume (its first file write
    # runs cold filesystem code under TCG), so they live in /run (tmpfs) and are bind-mounted over /etc,
    # as systemd does with a transient machine id. Memory snapshots and hibernation keep them; a disk
    # snapshot boots as a new machine and gets new ones anyway.
    mkdir -p /run/kiln
    for name in hostname machine-id; do
        [ -e "/etc/$name" ] || : >"/etc/$name" 2>/dev/null || continue
        cat "/etc/$name" >"/run/kiln/$name"
        mount --bind "/run/kiln/$name" "/etc/$name" || say "cannot bind /run/kiln/$name over /etc/$name"
    done
}

setup_network() {
    ip link set lo up
    # virtio_net is loaded by the initramfs and binds synchronously, but poll briefly to be safe.
    tries=0
    while [ ! -e /sys/class/net/eth0 ]; do
        tries=$((tries + 1))
        if [ "$tries" -gt 100 ]; then
            say "eth0 did not appear; continuing without network"
            return
        fi
        sleep 0.01
    done
    ip addr add "$ip" dev eth0 || say "cannot set address $ip on eth0"
    ip link set eth0 up || say "cannot bring eth0 up"
    [ -n "$gw" ] && { ip route add default via "$gw" dev eth0 || say "cannot add default route via $gw"; }
}

setup_resolv_conf() {
    content=""
    old_ifs=$IFS
    IFS=,
    for server in $dns; do
        [ -n "$server" ] && content="${content}nameserver $server
"
    done
    IFS=$old_ifs
    [ -n "$content" ] || return
    # A symlink (for example into a systemd-resolved directory that does not exist here) would make the
    # write fail or land somewhere unexpected: replace it with a plain file. If /etc cannot be written,
    # bind-mount a file from /run over it so resolvers still see the right servers.
    [ -L /etc/resolv.conf ] && rm -f /etc/resolv.conf 2>/dev/null
    if ! printf '%s' "$content" >/etc/resolv.conf 2>/dev/null; then
        printf '%s' "$content" >/run/resolv.conf
        if [ -f /etc/resolv.conf ]; then
            mount --bind /run/resolv.conf /etc/resolv.conf || say "cannot update /etc/resolv.conf"
        else
            say "/etc/resolv.conf is not writable; DNS settings are in /run/resolv.conf"
        fi
    fi
}

resize_root() {
    [ "$resize" = 1 ] || return
    if command -v resize2fs >/dev/null 2>&1; then
        # Online growth: the host may have made the disk larger than the template's filesystem.
        resize2fs /dev/vda >/dev/null 2>&1 || say "resize2fs /dev/vda failed; the filesystem keeps its size"
    else
        say "kiln.resize=1 but this image has no resize2fs; the filesystem keeps its size"
    fi
}

link_virtio_ports() {
    # Without udev nothing creates the /dev/virtio-ports/NAME links that tools expect.
    for name_file in /sys/class/virtio-ports/*/name; do
        [ -e "$name_file" ] || return
        read -r port_name <"$name_file" || continue
        [ -n "$port_name" ] || continue
        dev=${name_file%/name}
        dev=${dev##*/}
        mkdir -p /dev/virtio-ports
        ln -sf "../$dev" "/dev/virtio-ports/$port_name"
    done
}

supervise_agent() {
    # Restart the agent whenever it exits, backing off up to 2s so a crash loop does not eat the CPU.
    delay=0
    while :; do
        read -r started _idle </proc/uptime
        /kiln/kiln-agent --port-name kiln.agent </dev/null
        status=$?
        say "agent exited with status $status; restarting"
        read -r now _idle </proc/uptime
        # An agent that ran for a while earns a quick restart; repeated fast failures back off.
        if [ $((${now%.*} - ${started%.*})) -ge 10 ]; then delay=0; fi
        case $delay in
            0) delay=0.1 ;;
            0.1) delay=0.5 ;;
            *) delay=2 ;;
        esac
        sleep "$delay"
    done
}

print_debug() {
    [ "$debug" = 1 ] || return
    read -r uptime _idle </proc/uptime
    say "debug: uptime ${uptime}s hostname $(cat /proc/sys/kernel/hostname)"
    ip addr show >/dev/console 2>&1
    ip route show >/dev/console 2>&1
    echo "--- /etc/resolv.conf" >/dev/console
    cat /etc/resolv.conf >/dev/console 2>&1
    echo "--- mounts" >/dev/console
    cat /proc/mounts >/dev/console
    echo "--- modules" >/dev/console
    cat /proc/modules >/dev/console
    echo "--- virtio ports" >/dev/console
    ls -l /dev/virtio-ports >/dev/console 2>&1
    df -h / >/dev/console 2>&1
}

shutdown_now() {
    # busybox poweroff/reboot/halt signal PID 1 (USR2/TERM/USR1); honour them like busybox init would.
    say "$1 requested"
    kill -TERM -1 2>/dev/null
    sleep 0.2
    kill -KILL -1 2>/dev/null
    sync
    "$1" -f
}

trap 'shutdown_now poweroff' USR2
trap 'shutdown_now reboot' TERM
trap 'shutdown_now halt' USR1

mount_api_filesystems
parse_cmdline
mark "filesystems mounted"
setup_hostname
setup_identity_files
setup_network
mark "network configured"
setup_resolv_conf
resize_root
link_virtio_ports
cd /root 2>/dev/null || cd /

if [ -x /kiln/kiln-agent ]; then
    supervise_agent &
    say "ready"
else
    say "/kiln/kiln-agent is missing or not executable; the host cannot control this VM"
fi
load_late_modules &
link_std_fds
print_debug

# PID 1 inherits every orphaned process; `wait` reaps them (busybox ash waits for any child). It only
# returns when the supervisor itself is gone, so re-check periodically instead of spinning.
while :; do
    wait
    sleep 1
done
