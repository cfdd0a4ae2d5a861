"""``python -m nkat.worker``: a supervised worker by default, ``--standalone``, or
``--merge-shards``.

Supervised, everything comes from the NKAT_* environment the supervisor sets
(docs/architecture.md); standalone, from the command line; ``--merge-shards`` reads
shard states from stdin (``nkat.worker.shards``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nkat.worker.backend import BACKENDS

DESCRIPTION = """\
Run a job: under nkat-supervise (the default; it sets NKAT_ENDPOINT, NKAT_TOKEN,
NKAT_EPOCH, NKAT_SUPERVISOR_PID, NKAT_BACKEND), or alone with --standalone, which
prints the result JSON (the same compute path, with no checkpoints or heartbeats).
--merge-shards reads msgpack {spec, states: [{range: [first, stop], state}, ...],
provenance} on stdin and prints the merged result JSON.
"""

EPILOG = """\
examples:
  python -m nkat.worker --standalone --set max_dimension=100000
  python -m nkat.worker --standalone --job mypkg.jobs:MyJob --set n=10 --out result.json

--set values are JSON literals where they parse (3, 0.5, true), else strings.
Keys batch_size, batch_size_adaptive, cpu_threads (0: every core), memory_limit and
memory_reserve (MB) tune the runtime; every other key is a job param. Exit codes: 0
done, 2 usage error (or shards that do not merge), and the worker codes of
nkat.protocol.exitcodes (11 fatal job error, 12 OOM, 13 CUDA sticky, 16 backend
unavailable).
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nkat.worker", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--standalone", action="store_true",
                        help="run without a supervisor and print the result")
    parser.add_argument("--merge-shards", action="store_true",
                        help="merge shard states read from stdin into the result JSON")
    parser.add_argument("--job", help="built-in job name or module:Class (default nkat-highdim)")
    parser.add_argument("--set", dest="sets", action="append", default=[],
                        metavar="KEY=VALUE", help="a job param or runtime setting (repeatable)")
    parser.add_argument("--backend", choices=BACKENDS, help="array backend (default auto)")
    parser.add_argument("--out", type=Path, metavar="FILE",
                        help="write the result JSON here instead of stdout")
    parser.add_argument("--check-spec", action="store_true",
                        help="read a run's spec (JSON {job, params}) on stdin and check it "
                             "the way a worker would: exit 0, or 2 with the job's own message")
    args = parser.parse_args(argv)
    # Each mode imports only what it runs: a spec check or a merge imports no ZeroMQ.
    if args.check_spec:
        from nkat.worker import spec_check
        return spec_check.check_spec(sys.stdin.read())
    if args.merge_shards:
        if args.standalone or args.job or args.sets or args.backend or args.out:
            parser.error("--merge-shards takes no other option: the spec comes with the "
                         "states on stdin")
        from nkat.worker import shards
        return shards.main()
    if not args.standalone:
        if args.job or args.sets or args.backend or args.out:
            parser.error("--job, --set, --backend and --out need --standalone; a supervised "
                         "worker reads NKAT_* from the environment")
        from nkat.worker import supervised
        supervised.main()
    from nkat.worker import standalone
    return standalone.run(args.job or "nkat-highdim", args.sets, args.backend or "auto",
                          args.out)


if __name__ == "__main__":
    sys.exit(main())
