"""nkat.supervisor: the CPU-only process that spawns, watches and restarts the GPU worker and owns the WAL."""
