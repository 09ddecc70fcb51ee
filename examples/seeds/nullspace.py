"""The nullspace snapshots page (seed 002) run against kiln: the page's code with only
`from nullspace import ...` changed to `from kiln import ...`.

Lines marked "(glue)" are not on the page: the page's "snap_..." placeholder is the snapshot made above, and
the page's table (hibernate/pause, reusable snapshot, fork) is exercised with the calls it names.
"""

# -- Create a reusable snapshot ------------------------------------------------------------------
from kiln import Sandbox

sandbox = Sandbox.create(template="base")
sandbox.files.write("/workspace/state.txt", "baseline\n")

snapshot = sandbox.create_snapshot()
print(snapshot.id)
print(sandbox.files.read("/workspace/state.txt"))

# -- Spawn from the snapshot ---------------------------------------------------------------------
from kiln import Sandbox  # noqa: E402,F811

first = Sandbox.create(snapshot_id=snapshot.id)
second = Sandbox.create(snapshot_id=snapshot.id)

try:
    first.files.write("/workspace/state.txt", "first child\n")
    second.files.write("/workspace/state.txt", "second child\n")

    print(first.files.read("/workspace/state.txt"))
    print(second.files.read("/workspace/state.txt"))
finally:
    first.kill()
    second.kill()

# -- Manage reusable snapshots -------------------------------------------------------------------
from kiln import Snapshot  # noqa: E402

snapshot = Snapshot.get(snapshot.id)  # (glue) the page's "snap_..." is the snapshot made above
print(snapshot.id, snapshot.sandbox_id, snapshot.created_at)

for item in Snapshot.list(sandbox_id=snapshot.sandbox_id):
    print(item.id, item.metadata)

Snapshot.delete(snapshot.id)

# -- Pause, snapshot, or fork: the page's table (glue) -------------------------------------------
# Fork: keeps the source running, one live child per request.
child = sandbox.fork()
print("fork child:", child.name, child.files.read("/workspace/state.txt").strip(), "| source:", sandbox.refresh().state)
child.kill()

# Hibernate stops the source VM; Sandbox.resume(id) brings it back where it was.
sandbox.stop()
print("hibernated:", sandbox.state)
sandbox = Sandbox.resume(sandbox.id)
print("after Sandbox.resume:", sandbox.state, sandbox.files.read("/workspace/state.txt").strip())

# Sandbox.connect(original_id) wakes a paused or a hibernated sandbox.
sandbox.pause()
print("after Sandbox.connect of a paused sandbox:", Sandbox.connect(sandbox.id).state)
sandbox.stop()
sandbox = Sandbox.connect(sandbox.id)
print(
    "after Sandbox.connect of a hibernated sandbox:", sandbox.state, sandbox.files.read("/workspace/state.txt").strip()
)
sandbox.kill()
