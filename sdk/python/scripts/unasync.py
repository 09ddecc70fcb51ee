#!/usr/bin/env python3
"""Generates the sync SDK (src/kiln/_sync/) from the asyncio one (src/kiln/_async/) with unasync, as
httpcore does: ``async``/``await`` go away and the names below are swapped for their sync twins.

    python scripts/unasync.py           # regenerate src/kiln/_sync/ (commit the result)
    python scripts/unasync.py --check   # exit 1 if the committed src/kiln/_sync/ differs (make test runs this)

Needs ``pip install unasync`` (in the ``dev`` extra). Differences that are more than async/await live as
function pairs in src/kiln/_io.py.
"""

from __future__ import annotations

import argparse
import difflib
import shutil
import sys
import tempfile
from pathlib import Path

# This file is named unasync.py too: take its directory off the path so the import finds the package.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
import unasync  # noqa: E402

PKG = Path(__file__).resolve().parent.parent / "src" / "kiln"

REPLACEMENTS = {
    # Public classes.
    "AsyncSandbox": "Sandbox",
    "AsyncSnapshot": "Snapshot",
    "AsyncVolume": "Volume",
    "AsyncOperation": "Operation",
    "AsyncCommands": "Commands",
    "AsyncFiles": "Files",
    "AsyncProcesses": "Processes",
    "AsyncEvents": "Events",
    "AsyncOutputCallback": "OutputCallback",
    # kiln.Client's method pairs.
    "arequest": "request",
    "arequest_json": "request_json",
    "astream": "stream",
    "aiter_ndjson": "iter_ndjson",
    "aclose": "close",
    # httpx.Response.
    "aiter_bytes": "iter_bytes",
    "aiter_lines": "iter_lines",
    "aread": "read",
    # kiln/_io.py pairs.
    "aoffload": "offload",
    "acall": "call",
    "aread_chunks": "read_chunks",
    "asleep": "sleep",
}

HEADER = "# Generated from src/kiln/_async/{name} by scripts/unasync.py: do not edit; edit that file and rerun.\n"


def generate(out: Path) -> dict[str, str]:
    """Writes the generated files under ``out`` (a ``_sync`` directory); returns name -> text."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "_async"
        shutil.copytree(PKG / "_async", src, ignore=shutil.ignore_patterns("__pycache__"))
        files = sorted(str(p) for p in src.glob("*.py"))
        unasync.unasync_files(files, [unasync.Rule("/_async/", "/_sync/", additional_replacements=REPLACEMENTS)])
        texts = {}
        for p in sorted((Path(tmp) / "_sync").glob("*.py")):
            texts[p.name] = HEADER.format(name=p.name) + p.read_text()
    out.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        (out / name).write_text(text)
    return texts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only compare with the committed src/kiln/_sync/")
    args = ap.parse_args()
    target = PKG / "_sync"
    if not args.check:
        for stale in target.glob("*.py"):
            stale.unlink()
        texts = generate(target)
        print(f"generated {len(texts)} files in {target}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        texts = generate(Path(tmp) / "_sync")
    committed = {p.name: p.read_text() for p in target.glob("*.py")}
    drift = False
    for name in sorted(set(texts) | set(committed)):
        want, have = texts.get(name, ""), committed.get(name, "")
        if want != have:
            drift = True
            sys.stdout.writelines(
                difflib.unified_diff(
                    have.splitlines(True), want.splitlines(True), f"committed _sync/{name}", f"generated _sync/{name}"
                )
            )
    if drift:
        print("\nsrc/kiln/_sync/ is out of date with src/kiln/_async/: run `python sdk/python/scripts/unasync.py`")
        return 1
    print(f"src/kiln/_sync/ matches src/kiln/_async/ ({len(texts)} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
