#!/usr/bin/env python3
"""Handle missing and duplicate snapshots: get-or-create, idempotent delete, and error details."""

import kiln


def get_or_create(sb: kiln.Sandbox, name: str) -> kiln.Snapshot:
    """The snapshot called `name`, taking it from `sb` if it does not exist yet."""
    try:
        return kiln.Snapshot.get(name)
    except kiln.SnapshotNotFoundError:
        pass
    try:
        return sb.snapshot(name=name)
    except kiln.SnapshotAlreadyExistsError:
        return kiln.Snapshot.get(name)  # someone else took it in between


def delete_if_present(name: str) -> bool:
    try:
        kiln.Snapshot.delete(name)
        return True
    except kiln.SnapshotNotFoundError:
        return False


def main() -> None:
    try:
        kiln.Snapshot.get("no-such-snapshot").restore()
    except kiln.SnapshotNotFoundError as e:
        print(f"missing snapshot -> {type(e).__name__} [{e.code}, HTTP {e.status}]: {e}")

    with kiln.Sandbox.create(template="tiny", memory_mib=256) as sb:
        name = f"nightly-{sb.id}"
        first = get_or_create(sb, name)
        second = get_or_create(sb, name)
        print(f"get_or_create twice -> same snapshot: {first.id == second.id}")

        try:
            sb.snapshot(name=name)
        except kiln.SnapshotAlreadyExistsError as e:
            print(f"duplicate name -> {type(e).__name__} [{e.code}, HTTP {e.status}]: {e}")
        except kiln.ConflictError as e:  # every other 409 (sandbox paused, snapshot in use, ...)
            print(f"conflict: {e}")

        print(f"delete_if_present: {delete_if_present(name)}, again: {delete_if_present(name)}")
        try:
            first.restore()
        except kiln.KilnError as e:  # the base class carries code, status and message for any error
            print(f"restoring a deleted snapshot -> {e.code}: {e.message}")


if __name__ == "__main__":
    main()
