"""Shared pytest options and fixtures."""

from __future__ import annotations

import os

import pytest

from tests import e2e


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--crash-states", type=int, default=None, metavar="N",
                     help="WAL power-loss tests: check N crash states (0: every one)")


@pytest.fixture
def crash_states(request: pytest.FixtureRequest) -> int | None:
    """How many WAL crash states to check: --crash-states, else None (the test's own
    default); 0 on the command line means all."""
    value: int | None = request.config.getoption("--crash-states")
    return value


@pytest.fixture(scope="session", autouse=True)
def reference_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Reference results are computed once per session; under pytest-xdist each worker's
    base temp dir is a child of the run's, and the cache sits in the run's."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    e2e.REFERENCE_CACHE = base / "references"


#: The modules whose tests run longest (real processes waiting on real clocks), started
#: first so pytest-xdist's workers fill the time after them with the short tests. Order
#: only: every test runs either way.
LONGEST_FIRST = ("test_ray_engine", "test_supervisor_gpus", "test_supervisor_kill9",
                 "test_crash_campaign", "test_cli_newcomer", "test_wal_power_loss",
                 "test_gpu_supervised", "test_supervisor_limits", "test_cli_json",
                 "test_ops_service", "test_gpu_pid_release", "test_web_browser",
                 "test_supervisor_faults", "test_nkat_cuda", "test_nkat_nvrtc")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}

    def place(item: pytest.Item) -> int:
        module = item.nodeid.split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".py")
        return rank.get(module, len(rank))

    items.sort(key=place)  # stable: each module keeps its own order
