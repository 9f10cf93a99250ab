"""otpgate benchmarks: one table (medians and spreads) and the same as JSON.

    python -m bench.run [--quick] [--json PATH] [--only SECTION...]

Needs root (creates and removes its own local users and PAM service files). The
PostgreSQL rows (throughput, scale) need Debian's postgresql (scripts/test.sh installs
it): each run starts a private server (tests/store/pg_harness.py). With --only, the
JSON keeps the other sections' rows. `--only pg_profile` (not in the default run)
shows where a Verify's time goes on PostgreSQL against SQLite.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

from bench import lib

SECTIONS = ("hook_latency", "throughput", "storm", "login", "guess_rate", "scale", "network",
            "ssh_login")  # fmt: skip
EXTRA = ("pg_profile",)  # only with --only: a diagnosis, not a measurement to track


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    parser.add_argument("--json", default=str(lib.REPO / "bench" / "results.json"))
    parser.add_argument("--only", nargs="+", choices=SECTIONS + EXTRA, default=list(SECTIONS))
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench: run as root", file=sys.stderr)
        return 2
    rows: list[lib.Row] = []
    for section in args.only:
        module = __import__(f"bench.{section}", fromlist=["run"])
        print(f"bench: {section}...", file=sys.stderr, flush=True)
        started = time.monotonic()
        rows += module.run(args.quick)
        print(f"bench: {section} took {time.monotonic() - started:.0f} s", file=sys.stderr)
    lib.print_table(rows)
    machine = {
        "date": datetime.date.today().isoformat(),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }
    found = [dataclasses.asdict(r) for r in rows]
    if set(args.only) != set(SECTIONS):
        # A partial run replaces its own sections' rows and keeps the others'.
        found = _merge(Path(args.json), found)
    Path(args.json).write_text(json.dumps({"machine": machine, "rows": found}, indent=1))
    print(f"\n{machine['date']}, {machine['cpus']} CPUs, Python {machine['python']}; "
          f"JSON in {args.json}")  # fmt: skip
    return 0


def _merge(path: Path, new: list[dict[str, object]]) -> list[dict[str, object]]:
    """The rows in `path` with each section measured now replaced, in place, by `new`'s."""
    try:
        old: list[dict[str, object]] = json.loads(path.read_text())["rows"]
    except (OSError, ValueError, KeyError):
        return new
    measured = {r["section"] for r in new}
    merged: list[dict[str, object]] = []
    for row in old:
        if row["section"] not in measured:
            merged.append(row)
        elif not any(r["section"] == row["section"] for r in merged):
            merged += [r for r in new if r["section"] == row["section"]]
    return merged + [r for r in new if r not in merged]


if __name__ == "__main__":
    sys.exit(main())
