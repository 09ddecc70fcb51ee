#!/usr/bin/env python3
"""Fork a warmed-up sandbox into several children, try a different approach in each, and compare.

Every child starts from the parent's exact state (memory and disk) and diverges on its own; the parent is
untouched.
"""

import kiln

APPROACHES = {
    "sort numerically": "sort -n /work/data | head -1",
    "sort in reverse": "sort -rn /work/data | tail -1",
    "awk minimum": "awk 'NR == 1 || $1 < m { m = $1 } END { print m }' /work/data",
}


def main() -> None:
    with kiln.Sandbox.create(template="tiny", memory_mib=256) as parent:
        parent.run("mkdir -p /work && for i in $(seq 1 2000); do echo $(( (i * 7919) % 10007 )); done > /work/data")
        children = parent.fork(count=len(APPROACHES))
        try:
            results = {}
            for child, (label, cmd) in zip(children, APPROACHES.items(), strict=True):
                r = child.run(cmd)
                child.files.write("/work/result", r.stdout)  # each child's disk diverges on its own
                results[label] = (r.stdout.strip(), r.duration_ms, child.name)
            for label, (answer, ms, who) in results.items():
                print(f"{label:18} -> {answer:>6} in {ms:4d} ms ({who})")
            answers = {answer for answer, _, _ in results.values()}
            print("all approaches agree" if len(answers) == 1 else f"approaches disagree: {answers}")
            print(f"parent still has no result file: {not parent.files.exists('/work/result')}")
        finally:
            for child in children:
                child.delete()


if __name__ == "__main__":
    main()
