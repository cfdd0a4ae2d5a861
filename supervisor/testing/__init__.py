"""Stand-ins for what the tests and benchmarks cannot have here: a cloud's instance
metadata service (``metadata_fake``) and NVML (``fake_nvml``). Not used by the product;
shipped so that ``tools/`` can import them without reaching into ``tests/`` (like the
WAL's own ``nkat.supervisor.wal.testing``)."""
