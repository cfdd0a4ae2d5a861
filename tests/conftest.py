"""Shared pytest options and fixtures."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from tests import e2e

# The suite runs four pytest-xdist workers, and the processes they start, on as few as two
# cores. Nothing under test calls BLAS (the NKAT kernels are element-wise NumPy), so
# OpenBLAS's thread pool would only spin up at every NumPy import: about 80 ms of CPU in
# each of the suite's 160 or so workers. Set here, before the xdist workers start, so they
# and every process they start inherit it; a value the caller set is kept.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--crash-states", type=int, default=None, metavar="N",
                     help="WAL power-loss tests: check N crash states (0: every one)")


#: The session's base temp dir when this conftest made it (removed after a green run).
_SHORT_BASETEMP: str | None = None


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Give the session a short base temp dir. Runs put their sockets under the test's
    tmp_path, and a Unix socket's path stops at 107 bytes: pytest's default base
    (``pytest-of-USER/pytest-N`` in the temp dir) plus pytest-xdist's ``popen-gwN`` left too little
    room for a run's ``runs/ID/sock/worker``."""
    global _SHORT_BASETEMP
    if config.option.basetemp is None and not hasattr(config, "workerinput"):
        _SHORT_BASETEMP = config.option.basetemp = tempfile.mkdtemp(prefix="nkt-")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _SHORT_BASETEMP and exitstatus == 0:
        shutil.rmtree(_SHORT_BASETEMP, ignore_errors=True)


@pytest.fixture
def crash_states(request: pytest.FixtureRequest) -> int | None:
    """How many WAL crash states to check: --crash-states, else None (the test's own
    default); 0 on the command line means all."""
    value: int | None = request.config.getoption("--crash-states")
    return value


@pytest.fixture(scope="session", autouse=True)
def reference_cache(request: pytest.FixtureRequest,
                    tmp_path_factory: pytest.TempPathFactory) -> None:
    """Reference results are computed once per session; a pytest-xdist worker's base temp
    dir is ``popen-gwN`` under the session's, and the cache sits in the session's."""
    base = tmp_path_factory.getbasetemp()
    if hasattr(request.config, "workerinput") and base.name.startswith("popen-gw"):
        base = base.parent
    e2e.REFERENCE_CACHE = base / "references"


#: The modules whose tests run longest (most wait on real processes and clocks, a few
#: compute), longest first (from a run of the suite): pytest-xdist's workers start them
#: first and fill the time after them with the modules not listed, in collection order
#: (``--no-loadscope-reorder`` in pyproject.toml keeps this order). Order only: every
#: test runs either way.
LONGEST_FIRST = ("test_ray_engine", "test_cli_newcomer", "test_supervisor_kill9",
                 "test_supervisor_faults", "test_cli_json", "test_crash_campaign",
                 "test_worker_protocol", "test_web_browser", "test_gpu_supervised",
                 "test_web_server", "test_web_page", "test_supervisor_limits",
                 "test_supervisor_gpus", "test_worker_faults", "test_nkat_cuda",
                 "test_notify_delivery", "test_wal_power_loss", "test_ops_service",
                 "test_preemption_watch", "test_nkat_nvrtc", "test_wal_damage",
                 "test_protocol_codec", "test_ops_report", "test_gpu_pid_release",
                 "test_supervisor_remote")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}

    def place(item: pytest.Item) -> int:
        module = item.nodeid.split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".py")
        return rank.get(module, len(rank))

    items.sort(key=place)  # stable: each module keeps its own order
