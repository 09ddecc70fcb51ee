#!/bin/sh
# The smolvm snapshot CLI page (seed 003) run against kiln: every command as on the page, with the program
# name `smolvm` changed to `kiln`. Lines marked (glue) are not on the page: they make the page's sandbox,
# show what the commands did, and clean up. Needs `kiln` on PATH and a running daemon (KILN_SOCKET).
set -eu

kiln sandbox create --name my-sandbox --template tiny >/dev/null   # (glue) the page's sandbox
state() { kiln --json sandbox inspect my-sandbox | tr ',' '\n' | grep '"state"' | cut -d'"' -f4; }  # (glue)

# -- create
kiln sandbox snapshot create my-sandbox \
  --snapshot-id before-deploy \
  --resume-source
echo "after --resume-source my-sandbox is $(state)"   # (glue)
kiln exec my-sandbox -- sh -c 'echo deployed > /root/deploy.txt'   # (glue) a change to roll back

# Create a QEMU disk-only snapshot:
kiln sandbox snapshot create my-sandbox --snapshot-type disk
echo "without --resume-source my-sandbox is $(state)"   # (glue)
DISK_ID=$(kiln sandbox snapshot list --vm-id my-sandbox --json | tr ',' '\n' | grep '"id"' | cut -d'"' -f4 | grep -v '^before-deploy$')   # (glue)
echo "disk snapshot: $DISK_ID"   # (glue)

# -- restore
kiln sandbox snapshot restore before-deploy --resume
echo "after restore my-sandbox is $(state); deploy.txt: $(kiln exec my-sandbox -- sh -c 'cat /root/deploy.txt 2>/dev/null || echo absent')"   # (glue)
if kiln sandbox snapshot restore before-deploy --resume 2>/dev/null; then exit 1; fi   # (glue)
echo "restoring before-deploy again without --force: refused"   # (glue)

# -- list
kiln sandbox snapshot list
kiln sandbox snapshot list --vm-id my-sandbox
kiln sandbox snapshot list --vm-id my-sandbox --json | grep -c '"id"' | sed 's/^/snapshots of my-sandbox: /'   # (glue)

# -- delete
if kiln sandbox snapshot delete before-deploy 2>/dev/null; then exit 1; fi   # (glue)
echo "deleting before-deploy while the sandbox restored from it runs: refused"   # (glue)
kiln sandbox delete -y my-sandbox >/dev/null   # (glue)
kiln sandbox snapshot restore before-deploy --resume --force   # (glue) --force: restored once already
kiln sandbox delete -y my-sandbox >/dev/null   # (glue)
kiln sandbox snapshot delete before-deploy
kiln sandbox snapshot delete "$DISK_ID" --json
echo "done"   # (glue)
