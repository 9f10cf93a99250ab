"""otpgate benchmarks: one table (medians and spreads) and the same as JSON.

    python -m bench.run [--quick] [--json PATH] [--only SECTION...]

Needs root (creates and removes its own local users and PAM service files).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
from pathlib import Path

from bench import lib

SECTIONS = ("hook_latency", "throughput", "storm", "login", "guess_rate", "scale")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    parser.add_argument("--json", default=str(lib.REPO / "bench" / "results.json"))
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench: run as root", file=sys.stderr)
        return 2
    rows: list[lib.Row] = []
    for section in args.only:
        module = __import__(f"bench.{section}", fromlist=["run"])
        print(f"bench: {section}...", file=sys.stderr, flush=True)
        rows += module.run(args.quick)
    lib.print_table(rows)
    machine = {
        "date": datetime.date.today().isoformat(),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }
    Path(args.json).write_text(
        json.dumps({"machine": machine, "rows": [dataclasses.asdict(r) for r in rows]}, indent=1)
    )
    print(f"\n{machine['date']}, {machine['cpus']} CPUs, Python {machine['python']}; "
          f"JSON in {args.json}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
