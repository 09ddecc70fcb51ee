#!/usr/bin/env python3
"""An agent loop that leaves its sandbox idle between steps: the daemon hibernates it by itself and the next
command wakes it, with everything in RAM (here a tmpfs file) where it was.

`idle_timeout` is how long the sandbox may sit unused before `on_timeout` ("hibernate": RAM to disk, the VM
process exits) applies; `auto_resume` (the default with a lifetime) starts it again on the next exec, file or
process call. `timeout` bounds its whole life; `set_timeout` renews it.
"""

import time

import kiln

IDLE = 4  # seconds; an agent platform would use minutes


def wait_for_state(sb: kiln.Sandbox, state: str, limit: float) -> float:
    t = time.monotonic()
    while sb.refresh().state != state:  # looking at a sandbox does not wake it
        if time.monotonic() - t > limit:
            raise RuntimeError(f"sandbox is {sb.state}, not {state}, after {limit} s")
        time.sleep(0.2)
    return time.monotonic() - t


def main() -> None:
    with kiln.Sandbox.create(template="tiny", memory_mib=256, timeout=600, idle_timeout=IDLE) as sb:
        print(f"lifetime: {sb.lifetime}")
        # Step 1: the agent builds up state in memory.
        sb.run("echo 'step 1: plan' > /dev/shm/notes")
        print("step 1 done; the agent thinks for a while (no calls)")

        took = wait_for_state(sb, "stopped", IDLE + 30)
        print(f"hibernated by itself {took:.1f} s later (idle timeout {IDLE} s): VM process={sb.pid}")

        # Step 2: the next command wakes it; the tmpfs (RAM) content is still there.
        t = time.monotonic()
        r = sb.run("echo 'step 2: act' >> /dev/shm/notes; cat /dev/shm/notes")
        print(f"woke on exec in {time.monotonic() - t:.2f} s; notes:\n{r.stdout}", end="")
        assert r.stdout == "step 1: plan\nstep 2: act\n", r.stdout
        sb.refresh()
        assert sb.state == "running"

        # The agent needs longer: renew its life (counts from now).
        sb.set_timeout(1200)
        print(f"renewed: timeout {sb.lifetime.timeout} s, expires at {sb.lifetime.expires_at}")
        print("the agent loop survived an automatic hibernation")


if __name__ == "__main__":
    main()
