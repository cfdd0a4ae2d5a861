"""The supervisor's pure policies: each takes readings and a ``now`` and answers what to
do, with no processes, sockets, files or sleeps. Only the run controller
(``nkat.supervisor.controller``) calls them; docs/architecture.md shows where they sit.

watchdog (liveness and progress), restart_policy (exit classes, backoff, crash loops),
kill_sequence (cmd stop → dump → SIGTERM → SIGKILL), thermal (the temperature ladder),
resources (GPU memory, worker RSS, power), lifecycle (worker states and moves), xid (what
an Xid means), settings (each policy's config keys, with defaults, ranges and help).
"""
