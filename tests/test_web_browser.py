"""The status page in a real browser: Debian's chromium, driven by Playwright at phone size,
watching a real run on a scripted GPU. Progress must advance without a reload, a stop must
show as stopped, nothing may overflow the phone's width, and the page must run under its
own Content-Security-Policy without an error. Screenshots go to the test's tmp dir.

Skipped, with the reason, only where playwright or chromium is missing (CI installs both;
Playwright's own browser download is never used)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.e2e import IDLING, SupervisedRun, reap_processes  # noqa: F401 - autouse fixture

if TYPE_CHECKING:
    from playwright.sync_api import Page

# Playwright is imported by the fixture, not at collection, which every xdist worker pays for.
if importlib.util.find_spec("playwright") is None:
    pytest.skip("playwright is not installed (pip install playwright; no browser download "
                "is needed: the test drives the system chromium)", allow_module_level=True)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("chromium is not installed (apt-get install -y chromium)",
                allow_module_level=True)

REPO = Path(__file__).resolve().parent.parent
CALM = REPO / "supervisor" / "profiles" / "calm.toml"
PHONE = {"width": 390, "height": 844}
# No network but loopback, no background services, a fresh profile each time.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture
def phone(tmp_path: Path) -> Iterator[tuple[Page, list[str]]]:
    """A phone-sized page in headless chromium, and the errors it reports."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_ARGS, viewport=PHONE, device_scale_factor=2, is_mobile=True,
            has_touch=True)
        page = context.new_page()
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        try:
            yield page, errors
        finally:
            context.close()


def serve(state: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-m", "nkat.supervisor.ops.serve", "--state-dir",
                             str(state), "--addr", "127.0.0.1:0"], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("serving the runs in "), line + (proc.stderr.read()
                                                            if proc.stderr else "")
    return proc, line.rsplit(" on ", 1)[1].strip()


def wait_js(page: Page, expression: str, timeout: float = 20) -> Any:
    """Until ``expression`` is truthy in the page. Polled from here: Playwright's own
    wait_for_function evaluates a string with eval(), which the page's CSP forbids."""
    deadline = time.monotonic() + timeout
    while True:
        value = page.evaluate(expression)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {expression}")
        time.sleep(0.1)


def units_shown(page: Page, run_id: str) -> int:
    text = page.get_attribute(f'article[data-run="{run_id}"]', "data-units") or "0"
    return int(text)


def test_a_phone_watches_a_run_progress_and_stop_without_reloading(phone, tmp_path):
    page, errors = phone
    run = SupervisedRun(tmp_path, "web", ["max_dimension=1000000000000",
                                          "checkpoint_interval=0.3", "gpu_log_interval=0.3"],
                        extra_args=["--sim-gpu", str(CALM)], failpoints=IDLING)
    run.start()
    run.wait_progress()
    server, url = serve(run.state)
    try:
        page.goto(url)
        card = 'article[data-run="web"]'
        wait_js(page, f"document.querySelector('{card} .badge')?.textContent === 'running'")
        page.evaluate("window.__sameDocument = true")
        first = units_shown(page, "web")
        wait_js(page, f"Number(document.querySelector('{card}').dataset.units) > {first}")
        # The chart draws throughput and temperature once a few checkpoints and readings exist.
        page.wait_for_selector(f"{card} svg path.rate", timeout=20000)
        page.wait_for_selector(f"{card} svg path.temp", timeout=20000)
        assert page.evaluate("window.__sameDocument") is True  # no reload happened
        assert page.evaluate("performance.getEntriesByType('navigation').length") == 1
        assert "%" in (page.text_content(f"{card} .pct") or "")
        assert "dims/s" in (page.text_content(f"{card} .stats") or "")
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        page.screenshot(path=str(tmp_path / "status-phone-running.png"), full_page=True)

        stop = subprocess.run([sys.executable, "-m", "nkat.supervisor", "stop", "--state-dir",
                               str(run.state), "web"], capture_output=True, text=True,
                              timeout=60)
        assert stop.returncode == 0, stop.stderr
        assert run.wait(60) == 4
        wait_js(page, f"document.querySelector('{card} .badge')?.textContent === 'stopped'")
        assert page.evaluate("window.__sameDocument") is True
        page.screenshot(path=str(tmp_path / "status-phone-stopped.png"), full_page=True)
    finally:
        server.terminate()
        server.wait(15)
    assert errors == []  # CSP violations and script errors show up here
    for name in ("status-phone-running.png", "status-phone-stopped.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    print(f"screenshots: {tmp_path}")


def test_the_page_shows_its_token_prompt_and_then_the_runs_on_a_phone(phone, tmp_path):
    page, _errors = phone
    token = "phone-token-0123456789abcdef"
    (tmp_path / "token").write_text(token)
    (tmp_path / "state").mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "nkat.supervisor.ops.serve", "--state-dir",
                             str(tmp_path / "state"), "--addr", "127.0.0.1:0", "--token-file",
                             str(tmp_path / "token")], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().rsplit(" on ", 1)[1].strip()
        reply: Any = page.goto(url)
        assert reply.status == 401 and "needs its token" in (page.text_content("body") or "")
        page.goto(url + "?token=" + token)
        assert page.url == url  # the token left the address bar; a cookie holds it
        page.wait_for_selector("text=No runs in this state directory yet.", timeout=10000)
        page.reload()
        page.wait_for_selector("#conn.ok", timeout=10000)
    finally:
        proc.terminate()
        proc.wait(15)
