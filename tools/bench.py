"""Benchmarks: ``python tools/bench.py SUITE [--json]``.

Each suite lives in ``tools/bench_<suite>.py`` and exposes ``run(args) -> dict`` of
figures measured in this one run (ratios where the machine's noise matters). Suites:
wal, nkat, supervisor, gpu, cli, remote, hardening, scale, tests.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

SUITES = ("wal", "nkat", "supervisor", "gpu", "cli", "remote", "hardening", "scale", "tests")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", choices=SUITES)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    args = parser.parse_args(argv)
    # Run as a script, tools/ is on the path already: the suites import as top-level modules.
    module = importlib.import_module(f"bench_{args.suite}")
    figures = module.run(args)
    if args.json:
        print(json.dumps(figures, indent=2, sort_keys=True))
    else:
        width = max(map(len, figures), default=0)
        for key, value in sorted(figures.items()):
            print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
