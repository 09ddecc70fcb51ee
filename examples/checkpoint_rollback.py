#!/usr/bin/env python3
"""Checkpoint a sandbox before a risky step, and roll it back when the step goes wrong.

The rollback keeps the sandbox's identity (same id and name): whoever holds its id keeps working with it.
"""

import kiln


def main() -> None:
    with kiln.Sandbox.create(template="tiny", memory_mib=256) as sb:
        sb.files.write("/srv/app/config.ini", "mode=stable\nworkers=4\n")
        sb.run("echo 'started' > /srv/app/log")

        checkpoint = sb.snapshot(name=f"before-upgrade-{sb.id}")
        print(f"checkpoint {checkpoint.id} taken ({checkpoint.size_bytes >> 20} MiB)")
        try:
            # The risky step: it corrupts the config and then fails.
            step = sb.run("echo 'mode=???' > /srv/app/config.ini && rm /srv/app/log && exit 17")
            if step.ok:
                print("upgrade succeeded")
                return
            broken = sb.files.read("/srv/app/config.ini")
            print(f"upgrade failed with exit code {step.exit_code}; config is now {broken!r}")

            restored = kiln.Sandbox.from_snapshot(checkpoint.id)  # rolls this very sandbox back
            assert restored.id == sb.id
            print(f"rolled back {restored.name}: state={restored.state}")
            print(f"config after rollback: {restored.files.read('/srv/app/config.ini')!r}")
            print(f"log after rollback: {restored.files.read('/srv/app/log')!r}")
        finally:
            checkpoint.delete()


if __name__ == "__main__":
    main()
