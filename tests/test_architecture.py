"""The house's shape, checked: the run controller does no I/O, and the packages import in
one direction only (docs/architecture.md)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: What the controller must never import: the shell's business.
IO_MODULES = {"zmq", "psutil", "subprocess", "os", "socket", "time"}


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports, at any depth of its code."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_the_controller_imports_no_io_module():
    found = imported_modules(REPO / "supervisor" / "controller.py") & IO_MODULES
    assert not found, f"supervisor/controller.py imports {sorted(found)}"


def test_importing_the_controller_loads_no_io_library():
    # os and time are loaded by the interpreter itself; these four are not.
    code = ("import sys, nkat.supervisor.controller\n"
            "print(sorted(m for m in ('zmq', 'psutil', 'subprocess', 'socket') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]", f"importing the controller loads {out}"


def test_the_policies_are_pure_too():
    for path in (REPO / "supervisor" / "policies").glob("*.py"):
        found = imported_modules(path) & IO_MODULES
        assert not found, f"{path.name} imports {sorted(found)}"


def test_packages_import_in_one_direction():
    for package, forbidden in (("supervisor", {"nkat.worker"}), ("worker", {"nkat.supervisor"}),
                               ("protocol", {"nkat.supervisor", "nkat.worker"})):
        for path in (REPO / package).rglob("*.py"):
            text = path.read_text()
            for name in forbidden:
                assert f"import {name}" not in text and f"from {name}" not in text, \
                    f"{path.relative_to(REPO)} imports {name}"


def test_the_event_kinds_documented_are_exactly_those_the_code_writes():
    import re

    from nkat.supervisor.journal import EventKind

    doc = (REPO / "docs" / "architecture.md").read_text()
    table = doc[doc.index("Event kinds"):doc.index("Logs written before")]
    documented = {k for pair in re.findall(r"^\| `([a-z_]+)`(?:, `([a-z_]+)`)?", table, re.M)
                  for k in pair if k}
    assert documented == {k.value for k in EventKind}
    code = "\n".join(p.read_text() for p in (REPO / "supervisor").rglob("*.py")
                     if p != REPO / "supervisor" / "journal.py")
    written = {k.value for k in EventKind if f"EventKind.{k.name}" in code}
    # gave_up is written through Event.gave_up(...)
    written |= {"gave_up"} if "Event.gave_up(" in code else set()
    assert written == documented, f"documented but never written: {documented - written}"


def test_tools_import_neither_tests_nor_worker_internals_nor_edit_sys_path():
    for path in (REPO / "tools").glob("*.py"):
        text = path.read_text()
        assert "sys.path" not in text, f"tools/{path.name} edits sys.path"
        modules = {n for n in _full_imports(path)}
        assert not any(m == "tests" or m.startswith("tests.") for m in modules), path.name
        internals = {m for m in modules if m.startswith("nkat.worker.")
                     and m not in PUBLIC_WORKER_MODULES}
        assert not internals, f"tools/{path.name} imports worker internals {sorted(internals)}"


#: What of the worker a tool may use: the job API and the shipped jobs.
PUBLIC_WORKER_MODULES = {"nkat.worker.job", "nkat.worker.jobs", "nkat.worker.jobs.nkat_highdim",
                         "nkat.worker.jobs.nkat_kernels"}


def _full_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names
