"""The status page over HTTP, without a browser: what it says about real runs (one completed,
one live on a scripted GPU), that it writes nothing to them, and who may read it."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nkat.supervisor.ops.report import Timeline
from nkat.supervisor.rundir import RunDir
from nkat.supervisor.web.access import AccessError, listen_token, read_token, token_matches
from nkat.supervisor.web.board import Board, compact, gpu_rows, json_safe
from nkat.supervisor.web.page import COOKIE, StatusPage, parse_open
from tests.e2e import IDLING, SupervisedRun, reap_processes, wait_for  # noqa: F401 - autouse fixture

REPO = Path(__file__).resolve().parent.parent
CALM = REPO / "supervisor" / "profiles" / "calm.toml"
TOKEN = "s3cret-token-for-tests-0123456789"


def get(port: int, path: str, headers: dict[str, str] | None = None,
        host: str | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest("GET", path, skip_host=host is not None)
        if host is not None:
            conn.putheader("Host", host)
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        conn.endheaders()
        reply = conn.getresponse()
        return reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read()
    finally:
        conn.close()


def api(port: int, open_runs: str = "", **kw: Any) -> dict[str, Any]:
    status, _headers, body = get(port, f"/api/runs?open={open_runs}", **kw)
    assert status == 200, body
    data: dict[str, Any] = json.loads(body)
    return data


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and directory under root with its size and modification time."""
    out = {}
    for path in [root, *root.rglob("*")]:
        st = path.lstat()
        out[str(path.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state dir holding one completed run, "done"."""
    tmp = tmp_path_factory.mktemp("web")
    run = SupervisedRun(tmp, "done", ["max_dimension=60000000", "checkpoint_interval=0.2"])
    run.start()
    assert run.wait(120) == 0, run.err
    return run.state


@pytest.fixture
def page(finished: Path) -> Iterator[StatusPage]:
    page = StatusPage(Board(finished), "127.0.0.1:0")
    page.start()
    yield page
    page.close()


def port_of(page: StatusPage) -> int:
    assert page.server.port is not None
    return page.server.port


def test_a_completed_run_shows_its_state_progress_and_result(page: StatusPage):
    data = api(port_of(page), "done:0")
    (card,) = data["runs"]
    assert card["run_id"] == "done" and card["state"] == "completed" and not card["live"]
    assert card["progress"] == 1.0 and card["units_done"] == card["units_total"] > 0
    assert card["rate"] is None and card["eta_s"] is None  # history, not a speed
    detail = data["details"]["done"]
    figures = dict(detail["result"])
    assert figures and any(key.startswith("performance.") for key in figures)
    assert detail["chart"]["checkpoints"] and detail["rate_unit"] == "dims/s"
    # The page holds that version now: the detail is not sent again until the log grows.
    again = api(port_of(page), f"done:{detail['version']}")
    assert again["details"] == {} and again["runs"][0]["state"] == "completed"


def test_serving_the_page_writes_nothing_to_any_run(finished: Path, page: StatusPage):
    before = tree(finished)
    time.sleep(0.05)  # a write now would show as a newer mtime
    for _ in range(3):
        api(port_of(page), "done:0")
        assert get(port_of(page), "/")[0] == 200
        time.sleep(0.6)  # past the board's refresh, so the files are read again
    assert tree(finished) == before


def test_the_page_is_one_document_whose_inline_code_the_policy_allows(page: StatusPage):
    status, headers, body = get(port_of(page), "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    csp = headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'sha256-" in csp
    assert "connect-src 'self'" in csp and "http" not in csp  # no other origin, no CDN
    assert b"<script src" not in body and b"<link rel=\"stylesheet\"" not in body
    assert headers["referrer-policy"] == "no-referrer"
    assert headers["x-content-type-options"] == "nosniff"


def test_a_loopback_page_refuses_a_request_naming_another_host(page: StatusPage):
    # A DNS-rebinding page on another site reaches 127.0.0.1 under its own name.
    assert get(port_of(page), "/", host="attacker.example:8765")[0] == 403
    assert get(port_of(page), "/api/runs", host=f"localhost:{port_of(page)}")[0] == 200
    assert get(port_of(page), "/api/runs", host=f"[::1]:{port_of(page)}")[0] == 200


def test_the_open_parameter_takes_run_ids_only():
    assert parse_open("a:3,b,../x:1,c:x,d/e:2,..:1") == {"a": 3, "b": 0, "c": 0}
    assert parse_open("") == {}


# A live run ------------------------------------------------------------------------------
def test_a_live_run_shows_rate_eta_gpu_chart_restarts_and_warnings(tmp_path):
    run = SupervisedRun(tmp_path, "live", ["max_dimension=1000000000000",
                                           "checkpoint_interval=0.2", "gpu_log_interval=0.2",
                                           "restart_delay=0.05"],
                        extra_args=["--sim-gpu", str(CALM)], failpoints=IDLING)
    run.start()
    run.wait_progress()
    run.kill_worker()
    run.wait_progress(epoch=2)
    page = StatusPage.for_run(RunDir.open(run.state, "live"), "127.0.0.1:0")
    page.start()
    try:
        def ready() -> dict[str, Any] | None:
            data = api(port_of(page), "live:0")
            detail = data["details"].get("live")
            if detail and detail["chart"]["rates"] and detail["chart"]["temperatures"] \
                    and detail["chart"]["restarts"] and data["runs"][0]["rate"]:
                return data
            return None
        data = wait_for(ready, 30, "a full picture of the live run", interval=0.3)
    finally:
        page.close()
    (card,) = data["runs"]
    assert card["live"] and card["state"] == "running" and card["restarts"] == 1
    assert card["rate_unit"] == "dims/s" and card["rate"] > 0 and card["eta_s"] > 0
    assert 0 <= card["checkpoint_age_s"] < 30 and card["durable_ckpt_seq"] > 0
    (gpu,) = card["gpus"]
    assert gpu["temperature"] > 0 and gpu["thermal_state"] == "normal" and gpu["duty"] == 1.0
    detail = data["details"]["live"]
    assert detail["restart_reasons"] == {"crashed": 1}
    assert any(w["event"] == "worker.restart_scheduled" for w in detail["warnings"])
    assert all(w["level"] in ("warning", "error", "critical") for w in detail["warnings"])


# GPU rows --------------------------------------------------------------------------------
def test_gpu_rows_come_from_gpus_when_present_else_from_gpu():
    status = {"state": "running", "progress": 0.5, "dims_per_s": 9.0,
              "gpu": {"temperature": 70, "duty": 0.5, "thermal_state": "throttled"}}
    (row,) = gpu_rows(status, {"gpu_index": 2})
    assert row == {"index": 2, "name": None, "shard": None, "progress": 0.5, "dims_per_s": 9.0,
                   "temperature": 70, "duty": 0.5, "thermal_state": "throttled",
                   "state": "running"}
    rows = [{"index": i, "name": f"GPU {i}", "shard": i, "progress": 0.1 * i,
             "dims_per_s": 1.0, "temperature": 60 + i, "duty": 1.0, "thermal_state": "normal",
             "state": "running", "extra": "dropped"} for i in range(3)]
    got = gpu_rows({**status, "gpus": rows}, {})
    assert [r["index"] for r in got] == [0, 1, 2] and "extra" not in got[0]
    assert gpu_rows({"gpu": None}, {}) == []


def test_a_long_run_keeps_its_whole_chart_in_bounded_points_with_gaps_and_peaks():
    tl = Timeline()
    # 1300 one-second intervals alternating 10 and 20 units/s, a restart gap after the 500th.
    for i in range(1300):
        start = i + (5.0 if i >= 500 else 0.0)
        tl.rates.append((start, start + 1.0, 10.0 if i % 2 == 0 else 20.0))
    tl.temperatures = [(float(t), 95.0 if t == 777 else 60.0) for t in range(1301)]
    tl.checkpoints = [float(t) for t in range(1301)]
    tl.restarts = [500.5]
    compact(tl, limit=600)
    assert len(tl.rates) <= 1200 and len(tl.temperatures) <= 1200 and len(tl.checkpoints) <= 1200
    assert tl.rates[0][0] == 0.0 and tl.rates[-1][1] == 1305.0  # the whole run is still there
    assert {r for _a, _b, r in tl.rates} == {15.0}  # time-weighted: 10 and 20 make 15
    assert any(b == 500.0 for _a, b, _r in tl.rates)  # the gap before 505 is not bridged
    assert all(not (a < 502.0 < b) for a, b, _r in tl.rates)
    assert max(c for _t, c in tl.temperatures) == 95.0  # the peak survives
    assert tl.restarts == [500.5]


def test_json_for_the_browser_has_no_nan():
    assert json_safe({"a": [float("nan"), 1.5, float("inf")], "b": {"c": 2}}) == \
        {"a": [None, 1.5, None], "b": {"c": 2}}


# Who may read --------------------------------------------------------------------------------
def test_a_non_loopback_address_needs_a_token(tmp_path):
    with pytest.raises(AccessError, match="token"):
        listen_token("0.0.0.0:8765", None)
    with pytest.raises(AccessError):
        listen_token("myhost.example:8765", None)  # a name may resolve anywhere
    assert listen_token("127.0.0.1:8765", None) is None
    assert listen_token("[::1]:8765", None) is None
    assert listen_token("localhost:0", None) is None
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    assert listen_token("0.0.0.0:8765", token_file) == TOKEN
    with pytest.raises(AccessError):
        StatusPage(Board(tmp_path), "0.0.0.0:0")  # the class refuses too


@pytest.mark.parametrize("content", ["", "short", "has space inside it!!", "é" * 20])
def test_a_weak_or_odd_token_is_refused_with_how_to_make_one(tmp_path, content):
    token_file = tmp_path / "token"
    token_file.write_text(content)
    with pytest.raises(AccessError, match="secrets.token_urlsafe"):
        read_token(token_file)
    with pytest.raises(AccessError, match="cannot read"):
        read_token(tmp_path / "missing")


def test_tokens_compare_exactly():
    assert token_matches(TOKEN, TOKEN)
    assert not token_matches(TOKEN, TOKEN[:-1]) and not token_matches(TOKEN, None)
    assert not token_matches(TOKEN, TOKEN + "x")


def serve_command(*args: str, state: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nkat.supervisor.ops.serve", "--state-dir",
                           str(state), *args], capture_output=True, text=True, timeout=30,
                          cwd=REPO)


def test_serve_on_a_public_address_without_a_token_refuses_with_exit_2(tmp_path):
    out = serve_command("--addr", "0.0.0.0:0", state=tmp_path)
    assert out.returncode == 2
    assert "not a loopback address" in out.stderr and "--token-file" in out.stderr
    assert "Traceback" not in out.stderr
    out = serve_command("--addr", "0.0.0.0:0", "--token-file", str(tmp_path / "nope"),
                        state=tmp_path)
    assert out.returncode == 2 and "cannot read it" in out.stderr


def test_a_token_page_answers_only_to_its_token_and_trades_the_query_for_a_cookie(
        finished: Path):
    page = StatusPage(Board(finished), "127.0.0.1:0", token=TOKEN)
    page.start()
    port = port_of(page)
    try:
        assert get(port, "/")[0] == 401
        assert get(port, "/api/runs")[0] == 401
        assert get(port, "/api/runs", {"Authorization": "Bearer wrong-token-0123456789"})[0] \
            == 401
        assert get(port, "/?token=" + TOKEN[:-1])[0] == 401
        assert api(port, headers={"Authorization": f"Bearer {TOKEN}"})["runs"]
        status, headers, _ = get(port, f"/?token={TOKEN}")
        assert status == 303 and headers["location"] == "/"  # the token leaves the address
        cookie = headers["set-cookie"]
        assert cookie.startswith(f"{COOKIE}={TOKEN};")
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        assert get(port, "/", {"Cookie": f"{COOKIE}={TOKEN}"})[0] == 200
        assert api(port, headers={"Cookie": f"{COOKIE}={TOKEN}"})["runs"]
        # With a token, the host name is not the gate: a phone names the machine's address.
        assert get(port, "/api/runs", {"Cookie": f"{COOKIE}={TOKEN}"},
                   host="192.0.2.7:8765")[0] == 200
    finally:
        page.close()


def test_serve_prints_its_address_serves_and_stops_on_sigterm(finished: Path):
    proc = subprocess.Popen([sys.executable, "-m", "nkat.supervisor.ops.serve", "--state-dir",
                             str(finished), "--addr", "127.0.0.1:0"], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("serving the runs in ") and "http://127.0.0.1:" in line
        port = int(line.rsplit(":", 1)[1].strip(" /\n"))
        assert api(port)["runs"][0]["run_id"] == "done"
        proc.terminate()
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in (proc.stderr.read() if proc.stderr else "")
    assert os.path.isdir(finished)


def _config_has(key: str) -> bool:
    from nkat.supervisor.config import KEYS

    return any(k.name == key for k in KEYS)


@pytest.mark.skipif(not _config_has("http_addr"),
                    reason="the run loop does not start the page yet (no http_addr key)")
def test_a_supervisor_serves_its_own_page_at_http_addr(tmp_path):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    run = SupervisedRun(tmp_path, "own", ["max_dimension=1000000000000",
                                          f"http_addr=127.0.0.1:{port}"], failpoints=IDLING)
    run.start()
    run.wait_progress()
    (card,) = wait_for(lambda: api(port, "own:0")["runs"], 30, "the run's own page")
    assert card["run_id"] == "own" and card["live"] and card["state"] == "running"
    stop = subprocess.run([sys.executable, "-m", "nkat.supervisor", "stop", "--state-dir",
                           str(run.state), "own"], capture_output=True, text=True, timeout=60)
    assert stop.returncode == 0, stop.stderr
    assert run.wait(60) == 4
    with pytest.raises(OSError):  # the page went with its supervisor
        get(port, "/api/runs")
