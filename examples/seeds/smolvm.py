"""The smolvm snapshots page (seed 004) run against kiln: the page's code with only
`from smolvm import ...` changed to `from kiln.compat.smolvm import ...`.

The VMs boot kiln's `base` image (Debian with python3; kiln.compat.smolvm's default), which has no `apk`
or `pip`: those commands fail (their results are not checked on the page either) and python3 is there
already. Lines marked "(glue)" are not on the page: where the page shows alternatives or fragments that
reuse an id or a closed VM, the glue gives them a VM or a fresh id; at the end the snapshots are deleted.
"""

# -- Create a snapshot ---------------------------------------------------------------------------
from kiln.compat.smolvm import SmolVM

vm = SmolVM()
vm.start()

# Install packages and configure the environment
vm.run("apk add python3 py3-pip")
vm.run("pip install requests")

# Save the current state
snapshot = vm.snapshot(snapshot_id="my-checkpoint")
print(f"Snapshot created: {snapshot.snapshot_id}")

vm.close()

# Pass resume_source=True to keep working with it:
vm = SmolVM()  # (glue) the fragment continues a VM
vm.start()  # (glue)
snapshot = vm.snapshot(
    snapshot_id="my-checkpoint-resumed",  # (glue) the page reuses "my-checkpoint", taken above
    resume_source=True,
)
# VM is still running — you can continue using it
result = vm.run("echo 'still running'")
print(result.output)  # (glue)
vm.close()  # (glue)

# -- Choose a snapshot type ----------------------------------------------------------------------
from kiln.compat.smolvm import SmolVM  # noqa: E402,F811

vm = SmolVM()
vm.start()

# Space-saving snapshot — stores only what changed since the base image
snapshot = vm.snapshot(
    snapshot_id="nightly-checkpoint",
    snapshot_type="diff",
)
print(snapshot.snapshot_type)  # SnapshotType.DIFF

vm.close()

from kiln.compat.smolvm import SnapshotType  # noqa: E402

vm = SmolVM()  # (glue) the fragment snapshots a VM
vm.start()  # (glue)
snapshot = vm.snapshot(snapshot_type=SnapshotType.DIFF)
print(f"generated id: {snapshot.snapshot_id}")  # (glue)
vm.close()  # (glue)
generated_id = snapshot.snapshot_id  # (glue)

from kiln.compat.smolvm import SmolVM, SnapshotType  # noqa: E402,F811

vm = SmolVM(backend="qemu")
vm.start()
vm.run("apk add python3")

# Fast, lightweight snapshot — disk only, no RAM
snapshot = vm.snapshot(
    snapshot_id="cold-boot-checkpoint",
    snapshot_type=SnapshotType.DISK,
)

# Later — restoring boots the sandbox fresh from the saved disk
vm = SmolVM.from_snapshot("cold-boot-checkpoint", resume_vm=True)
result = vm.run("python3 --version")  # python3 is already installed
print(f"after the cold boot: {result.output}")  # (glue)
vm.close()  # (glue)

# -- Restore a snapshot --------------------------------------------------------------------------
from kiln.compat.smolvm import SmolVM  # noqa: E402,F811

# Restore and resume the VM in one step
vm = SmolVM.from_snapshot("my-checkpoint", resume_vm=True)
print(f"Restored VM: {vm.vm_id}")
print(f"Status: {vm.status}")  # VMState.RUNNING

# The VM is back exactly where it was
result = vm.run("python3 -c 'import requests; print(requests.__version__)'")
print(result.output)

vm.close()

vm = SmolVM.from_snapshot("my-checkpoint", resume_vm=True, force=True)
print(f"restored again with force: {vm.status}")  # (glue)

# -- List snapshots ------------------------------------------------------------------------------
from kiln.compat.smolvm import SmolVMManager  # noqa: E402

with SmolVMManager() as sdk:
    snapshots = sdk.list_snapshots()
    for snap in snapshots:
        print(f"{snap.snapshot_id}  vm={snap.vm_id}  restored={snap.restored}")
    snapshots = sdk.list_snapshots(vm_id="my-vm")
    print(f"snapshots of my-vm: {len(snapshots)}")  # (glue) no VM is called my-vm here
    print(f"snapshots of {vm.vm_id}: {[s.snapshot_id for s in sdk.list_snapshots(vm_id=vm.vm_id)]}")  # (glue)

# -- Delete a snapshot ---------------------------------------------------------------------------
from kiln.compat.smolvm import SmolVMError, SmolVMManager  # noqa: E402,F811  (glue: SmolVMError)

try:  # (glue) the VM restored from my-checkpoint above still runs, so the page's rule refuses this
    with SmolVMManager() as sdk:
        sdk.delete_snapshot("my-checkpoint")
except SmolVMError as e:  # (glue)
    print(f"delete refused while the restored VM runs: {e.message}")  # (glue)
vm.close()  # (glue)

with SmolVMManager() as sdk:
    sdk.delete_snapshot("my-checkpoint")
print("my-checkpoint deleted")  # (glue)

# -- Full example: checkpoint and retry ----------------------------------------------------------
from kiln.compat.smolvm import SmolVM, SmolVMError  # noqa: E402,F811

# Set up a sandbox
vm = SmolVM()
vm.start()
vm.run("apk add python3")

# Checkpoint before the risky step
snapshot = vm.snapshot(snapshot_id="before-experiment")
vm.close()

# Restore and try the experiment
vm = SmolVM.from_snapshot("before-experiment", resume_vm=True)
result = vm.run("python3 -c 'import this_will_fail'")

if not result.ok:
    print("Experiment failed — rolling back")
    vm.stop()
    vm.delete()

    # Restore from checkpoint and try a different approach
    vm = SmolVM.from_snapshot("before-experiment", resume_vm=True, force=True)
    result = vm.run("python3 -c 'print(42)'")
    print(result.output)  # 42

vm.close()

# -- Snapshot ID rules (glue) --------------------------------------------------------------------
vm = SmolVM()  # (glue) a VM for the error handling below
vm.start()  # (glue)
try:  # (glue)
    vm.snapshot(snapshot_id="My Checkpoint")  # (glue)
except SmolVMError as e:  # (glue)
    print(f"invalid snapshot id refused: {e.message}")  # (glue)
vm.snapshot(snapshot_id="my-checkpoint", resume_source=True)  # (glue) so that the next one exists

# -- Error handling ------------------------------------------------------------------------------
from kiln.compat.smolvm import (  # noqa: E402,F811
    SmolVM,
    SnapshotAlreadyExistsError,
    SnapshotNotFoundError,
    SnapshotType,
    SmolVMError,
)

try:
    snapshot = vm.snapshot(snapshot_id="my-checkpoint")
except SnapshotAlreadyExistsError:
    print("A snapshot with this ID already exists")
except SmolVMError as e:
    print(f"Snapshot failed: {e.message}")

try:
    vm = SmolVM.from_snapshot("missing-snapshot")
except SnapshotNotFoundError:
    print("Snapshot not found")

# -- Clean up (glue) -----------------------------------------------------------------------------
vm.close()
with SmolVMManager() as sdk:
    for snap_id in [
        "my-checkpoint",
        "my-checkpoint-resumed",
        "nightly-checkpoint",
        generated_id,
        "cold-boot-checkpoint",
        "before-experiment",
    ]:
        sdk.delete_snapshot(snap_id)
print("all snapshots deleted")
