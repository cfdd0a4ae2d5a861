"""nkat.worker: the GPU side — the job API, the runtime that runs a job under the
supervisor, and built-in jobs."""
