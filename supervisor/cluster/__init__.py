"""The Ray engine (``start --engine ray``): one run's shards on the nodes of a Ray cluster.

``settings`` (the config keys and the lazy ``import ray``) is all the supervisor loads
without ``--engine ray``; the rest imports Ray's pieces only when a run uses it.
``engine`` joins the cluster and cuts the run; ``driver`` schedules shards onto node
agents and reacts to lost nodes; ``journal`` is the run's WAL writer on the driver's
machine; ``node`` is the agent that runs the supervisor's own loop on each node, whose
log (``remote_log``) is the driver's journal; ``board`` shapes the status. See
docs/architecture.md, "Many machines: the Ray engine".
"""

#: What ``--engine`` takes (here, so that the command line need not import the settings).
ENGINES = ("local", "ray")
