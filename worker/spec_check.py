"""``python -m nkat.worker --check-spec``: a run's spec checked by the job itself, before
the run exists.

The supervisor asks this of every new run (``nkat.supervisor.spawn.check_job_spec``), in
a process of its own because a job may import anything. It imports the job and nothing
of the runtime: no ZeroMQ, no heartbeat, no NumPy unless the job's module needs it to
build itself. Its place: docs/architecture.md.
"""

from __future__ import annotations

import json
import sys

from nkat.worker.job import JobNotFound, JobParamsError, resolve_job

#: The spec is refused (an unknown job, a module that does not import, a bad param): the
#: command-line exit code the supervisor reads as "the job's own message is on stderr".
USAGE_ERROR = 2


def check_spec(text: str) -> int:
    """Check a run's spec ({job, params} as JSON) as a worker would, before any run exists:
    the job must import and accept its params. 0 with {units_total, shardable} as JSON on
    stdout, or 2 with the job's message on stderr."""
    try:
        spec = json.loads(text)
        if not isinstance(spec, dict) or not isinstance(spec.get("job"), str) \
                or not isinstance(spec.get("params", {}), dict):
            raise ValueError("expected {\"job\": name, \"params\": {...}}")
        job_class = resolve_job(spec["job"])
    except (JobNotFound, ValueError) as exc:
        print(str(exc), file=sys.stderr)
        return USAGE_ERROR
    try:
        job = job_class(spec.get("params", {}))
        facts = {"units_total": int(job.units_total()), "shardable": bool(job.shardable)}
    except JobParamsError as exc:
        print(str(exc), file=sys.stderr)
        return USAGE_ERROR
    except Exception as exc:  # noqa: BLE001 - a custom job's own error, said as it is
        print(f"job {spec['job']!r} refused its params: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return USAGE_ERROR
    print(json.dumps(facts))  # what the supervisor plans shards with
    return 0
