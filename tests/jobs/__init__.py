"""Small jobs for tests, importable by worker processes as ``tests.jobs.<module>:<Class>``."""
