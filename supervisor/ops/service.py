"""``nkat-supervise install-service``: a systemd unit that resumes interrupted runs at boot.

    nkat-supervise install-service --print          # show the unit
    nkat-supervise install-service --user           # ~/.config/systemd/user/, then enable it

The unit runs ``start --boot``, which resumes only a run that was running when the
machine went down, never one an operator stopped. Nothing here calls systemctl: the
command prints the one to run.
"""

from __future__ import annotations

import argparse
import os
import pwd
import sys
from pathlib import Path

from nkat.supervisor.exitcode import ExitCode
from nkat.supervisor.rundir import atomic_write, state_dir

UNIT_NAME = "nkat-supervise.service"
SYSTEM_UNIT_DIR = Path("/etc/systemd/system")
# Exit codes of `start` that a restart cannot fix: usage/config error, gave up
# (crash loop, fatal job error, GPU needs reset), stopped by the operator.
NO_RESTART_CODES = (ExitCode.USAGE, ExitCode.GAVE_UP, ExitCode.STOPPED)
STOP_TIMEOUT_S = 60  # > stop_deadline (10 s) + term_grace (5 s) at their defaults
PERSISTENCED = "nvidia-persistenced.service"
_UNIT_DIRS = (Path("/etc/systemd/system"), Path("/run/systemd/system"),
              Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))


def _quote(arg: str) -> str:
    """One ExecStart= word: systemd expands % specifiers and $VARS, so double them."""
    arg = arg.replace("%", "%%").replace("$", "$$")
    if arg and not any(c.isspace() or c in "\"'\\;" for c in arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_unit(*, state: Path, python: str, user_unit: bool, run_as: str | None,
                persistenced: bool) -> str:
    """The unit text. ``run_as`` sets User= (system units only)."""
    argv = [python, "-m", "nkat.supervisor", "start", "--boot", "--quiet",
            "--state-dir", str(state)]
    unit = ["[Unit]",
            "Description=nkat-supervise: resume the GPU run interrupted by a shutdown"]
    if not user_unit:
        # A user manager cannot order itself against system units, so only the system
        # unit waits for the local file systems and the GPU driver's persistence daemon.
        after = ["local-fs.target"] + ([PERSISTENCED] if persistenced else [])
        unit.append("After=" + " ".join(after))
        if persistenced:
            unit.append(f"Wants={PERSISTENCED}")
    service = [
        "[Service]",
        "Type=simple",
        f"Environment={_quote('NKAT_STATE_DIR=' + str(state))}",
        "ExecStart=" + " ".join(_quote(a) for a in argv),
        "Restart=on-failure",
        "RestartSec=10",
        "RestartPreventExitStatus=" + " ".join(str(int(c)) for c in NO_RESTART_CODES),
        # An operator stop (systemctl stop sends SIGTERM: exit 4) is a clean end.
        "SuccessExitStatus=4",
        "KillSignal=SIGTERM",
        # SIGTERM to the supervisor only: it stops the worker itself (final checkpoint,
        # then its kill sequence). Signalling the worker too would cut that checkpoint.
        "KillMode=mixed",
        f"TimeoutStopSec={STOP_TIMEOUT_S}",
    ]
    if run_as and not user_unit:
        service.append(f"User={run_as}")
    install = ["[Install]", f"WantedBy={'default.target' if user_unit else 'multi-user.target'}"]
    return "\n".join(unit + [""] + service + [""] + install) + "\n"


def unit_path(user_unit: bool) -> Path:
    if not user_unit:
        return SYSTEM_UNIT_DIR / UNIT_NAME
    config = os.environ.get("XDG_CONFIG_HOME")
    base = Path(config).expanduser() if config else Path.home() / ".config"
    return base / "systemd" / "user" / UNIT_NAME


def _invoking_user() -> tuple[str, Path]:
    """The user the service runs as, and their home: under sudo, the one who ran it."""
    name = os.environ.get("SUDO_USER")
    entry = pwd.getpwnam(name) if name else pwd.getpwuid(os.getuid())
    return entry.pw_name, Path(entry.pw_dir)


def _service_state_dir(explicit: str | None, user_unit: bool) -> Path:
    """The state dir the service uses, absolute. Under sudo, $HOME may be root's, so the
    default is taken from the invoking user's home instead."""
    if explicit or os.environ.get("NKAT_STATE_DIR") or user_unit \
            or not os.environ.get("SUDO_USER"):
        return state_dir(explicit).resolve()
    _name, home = _invoking_user()
    return home / ".local" / "state" / "nkat-supervise"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--user", action="store_true",
                        help="install for your user (~/.config/systemd/user) instead of "
                             "the system (/etc/systemd/system, needs root)")
    parser.add_argument("--print", action="store_true", dest="print_only",
                        help="print the unit instead of installing it")


def run(args: argparse.Namespace) -> int:
    state = _service_state_dir(args.state_dir, args.user)
    user_name, _home = _invoking_user()
    text = render_unit(state=state, python=str(Path(sys.executable).absolute()),
                       user_unit=args.user, run_as=user_name,
                       persistenced=any((d / PERSISTENCED).exists() for d in _UNIT_DIRS))
    if args.print_only:
        sys.stdout.write(text)
        return ExitCode.OK
    path = unit_path(args.user)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, text.encode(), mode=0o644)
    except PermissionError:
        print(f"nkat-supervise: error: cannot write {path}: permission denied; run as root "
              "(sudo) or use --user", file=sys.stderr)
        return ExitCode.CHECK_FAILED
    scope = "--user " if args.user else ""
    print(f"wrote {path}")
    print(f"enable and start it with:\n  systemctl {scope}daemon-reload\n"
          f"  systemctl {scope}enable --now {UNIT_NAME}")
    if args.user:
        print(f"to run it at boot without logging in:\n  loginctl enable-linger {user_name}")
    return ExitCode.OK
