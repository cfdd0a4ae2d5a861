"""Shared pytest options and fixtures."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--crash-states", type=int, default=None, metavar="N",
                     help="WAL power-loss tests: check N crash states (0: every one)")


@pytest.fixture
def crash_states(request: pytest.FixtureRequest) -> int | None:
    """How many WAL crash states to check: --crash-states, else None (the test's own
    default); 0 on the command line means all."""
    value: int | None = request.config.getoption("--crash-states")
    return value
