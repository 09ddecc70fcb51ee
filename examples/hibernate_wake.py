#!/usr/bin/env python3
"""Hibernate an idle sandbox to free its RAM, and wake it later exactly where it was.

`stop()` saves the whole machine (memory, CPU, devices) to disk and the VM process exits; `start()` brings
the same sandbox back: same id, files, and running processes, which simply continue.
"""

import time

import kiln

# A background process that counts five times a second (it outlives the exec that starts it). It renames
# each value into place so that a read never sees a half-written file.
COUNTER = (
    "sh -c 'i=0; while true; do i=$((i+1)); echo $i > /tmp/c.new; mv /tmp/c.new /tmp/counter; sleep 0.2; done'"
    " >/dev/null 2>&1 &"
)


def main() -> None:
    with kiln.Sandbox.create(template="tiny", memory_mib=256) as sb:
        sb.run(COUNTER)
        time.sleep(1)
        before = int(sb.files.read("/tmp/counter"))
        print(f"counter before hibernating: {before}")

        t = time.monotonic()
        sb.stop()
        print(f"hibernated in {time.monotonic() - t:.2f} s: state={sb.state}, VM process={sb.pid}")
        time.sleep(2)  # nothing runs meanwhile: the machine is on disk

        t = time.monotonic()
        sb.start()
        woke = int(sb.files.read("/tmp/counter"))
        print(f"woke in {time.monotonic() - t:.2f} s: state={sb.state}, counter={woke}")
        time.sleep(1)
        after = int(sb.files.read("/tmp/counter"))
        print(f"the same counter process goes on: {after}")
        # Two seconds of hibernation would be ~10 counts had it kept running.
        assert woke - before < 5 and after > woke, "the counter should pause while hibernated, then go on"


if __name__ == "__main__":
    main()
