#!/usr/bin/env bash
# `make install` into a staging directory (DESTDIR, never the real /): the files land where a host expects
# them, the systemd unit passes `systemd-analyze verify` (when systemd is there), and the installed config
# file is one `kiln serve` accepts.
set -euo pipefail
cd "$(dirname "$0")/.."
D=$(mktemp -d /tmp/kiln-install.XXXXXX)
trap 'rm -rf "$D"' EXIT
make --no-print-directory install DESTDIR="$D" >/dev/null
for f in usr/local/bin/kiln usr/local/lib/kiln/kiln-agent etc/systemd/system/kiln.service etc/kiln/config.toml \
         var/lib/kiln/images/tiny/image.json; do
  test -e "$D/$f" || { echo "make install did not install /$f"; exit 1; }
done
grep -qx 'ExecStart=/usr/local/bin/kiln serve --config /etc/kiln/config.toml' "$D/etc/systemd/system/kiln.service"
if command -v systemd-analyze >/dev/null; then
  # verify wants ExecStart's binary to exist, so check a copy that points at the staged one.
  mkdir "$D/verify"
  sed "s|^ExecStart=/usr/local/bin/kiln|ExecStart=$D/usr/local/bin/kiln|" "$D/etc/systemd/system/kiln.service" >"$D/verify/kiln.service"
  systemd-analyze verify --man=no "$D/verify/kiln.service"
fi
# The shipped config parses (an invalid --max-sandboxes stops the daemon right after reading it).
out=$("$D/usr/local/bin/kiln" serve --config "$D/etc/kiln/config.toml" --max-sandboxes 0 2>&1 || true)
grep -q -- "--max-sandboxes must be at least 1" <<<"$out" || { echo "the installed config.toml was refused: $out"; exit 1; }
# A second install keeps an edited config file.
echo 'max_sandboxes = 3' >>"$D/etc/kiln/config.toml"
make --no-print-directory install DESTDIR="$D" >/dev/null
grep -q 'max_sandboxes = 3' "$D/etc/kiln/config.toml"
echo "make install: ok"
