#!/usr/bin/env bash
# Installs the host packages kiln needs on Debian/Ubuntu: QEMU 10 (bookworm-backports on Debian 12),
# qemu-utils, busybox-static, debootstrap, e2fsprogs, cpio, iptables (keeps guests off the host's own
# addresses), and the tools used to unpack the guest kernel; and creates the `kiln-qemu` system user and
# group (VM processes run as per-sandbox uids with this supplementary group; see docs/security.md).
# Idempotent: does nothing when everything is already there.
set -euo pipefail

say() { printf '\033[1m[kiln setup]\033[0m %s\n' "$*"; }
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

if ! getent group kiln-qemu >/dev/null; then
  say "creating the kiln-qemu system user and group"
  $SUDO useradd --system --user-group --no-create-home --home-dir /nonexistent \
    --shell /usr/sbin/nologin --comment "kiln VM processes" kiln-qemu
fi

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v qemu-img >/dev/null || need+=(qemu-utils)
[ -x /bin/busybox ] && /bin/busybox --list 2>/dev/null | grep -qx ip && file -L /bin/busybox 2>/dev/null | grep -q static || need+=(busybox-static)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v cpio >/dev/null || need+=(cpio)
command -v zstd >/dev/null || need+=(zstd)
command -v file >/dev/null || need+=(file)
command -v sqlite3 >/dev/null || need+=(sqlite3)
command -v python3 >/dev/null || need+=(python3)
python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
command -v iptables >/dev/null || need+=(iptables)
command -v strace >/dev/null || need+=(strace)  # tests/durability.rs records the daemon's fsyncs
# tests/oci.rs builds OCI images and serves them from a registry on loopback.
command -v skopeo >/dev/null || need+=(skopeo)
command -v umoci >/dev/null || need+=(umoci)
command -v docker-registry >/dev/null || need+=(docker-registry)
# `kiln image build -f Dockerfile` runs buildah (tests/oci.rs builds one).
command -v buildah >/dev/null || need+=(buildah)
# tests/remote.rs runs moto (an S3-compatible server from PyPI) from a venv in target/.
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)

# The S3 server of tests/remote.rs, installed into target/moto-venv (idempotent).
install_moto() {
  local root venv
  root="$(cd "$(dirname "$0")/.." && pwd)"
  venv="$root/target/moto-venv"
  if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import moto.server, boto3' 2>/dev/null; then
    return 0
  fi
  say "installing moto (S3 server for tests/remote.rs) into target/moto-venv"
  mkdir -p "$root/target"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q 'moto[server]'
}
# tests/dashboard.rs drives the web dashboard in headless Chromium through Playwright (pip, below).
command -v chromium >/dev/null || need+=(chromium)
command -v curl >/dev/null || need+=(curl)

qemu_major() { qemu-system-x86_64 --version 2>/dev/null | sed -n 's/.*version \([0-9]*\)\..*/\1/p' | head -n1; }
if command -v qemu-system-x86_64 >/dev/null && [ "$(qemu_major)" -lt 9 ]; then
  say "QEMU $(qemu_major) is too old; kiln needs QEMU >= 9 (upgrading)"
  need+=(qemu-system-x86)
fi

# Playwright's own browser download is not used (it drives /usr/bin/chromium), so the pip package is enough.
python_playwright() {
  python3 -c 'import playwright.sync_api' 2>/dev/null && return 0
  say "installing Python playwright (pip)"
  python3 -m pip install --quiet playwright 2>/dev/null || python3 -m pip install --quiet --break-system-packages playwright
}

if [ ${#need[@]} -eq 0 ]; then
  python_playwright
  say "host packages: all present ($(qemu-system-x86_64 --version | head -n1))"
  install_moto
  exit 0
fi

. /etc/os-release
backports=""
if [ "${ID:-}" = debian ] && [ "${VERSION_CODENAME:-}" = bookworm ]; then
  backports="bookworm-backports"
  if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    say "adding the bookworm-backports suite (for QEMU 10)"
    echo "deb http://deb.debian.org/debian bookworm-backports main" | $SUDO tee /etc/apt/sources.list.d/kiln-backports.list >/dev/null
  fi
fi
say "apt-get update"
$SUDO apt-get update -qq
say "installing: ${need[*]}"
qemu_pkgs=(); other=()
for p in "${need[@]}"; do
  case "$p" in qemu-system-x86|qemu-utils) qemu_pkgs+=("$p");; *) other+=("$p");; esac
done
export DEBIAN_FRONTEND=noninteractive
if [ ${#other[@]} -gt 0 ]; then $SUDO apt-get install -y -qq --no-install-recommends "${other[@]}"; fi
if [ ${#qemu_pkgs[@]} -gt 0 ]; then
  if [ -n "$backports" ]; then
    $SUDO apt-get install -y -qq --no-install-recommends -t "$backports" qemu-system-x86 qemu-utils
  else
    $SUDO apt-get install -y -qq --no-install-recommends qemu-system-x86 qemu-utils
  fi
fi
python_playwright
say "host packages ready: $(qemu-system-x86_64 --version | head -n1)"
install_moto
