"""nkat.supervisor: the CPU-only process that spawns, watches and restarts the GPU worker
and owns the write-ahead log. Never imports cupy or nkat.worker."""
