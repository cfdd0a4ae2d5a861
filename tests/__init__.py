"""Tests of nkat-supervise (run with pytest from the repository root)."""
