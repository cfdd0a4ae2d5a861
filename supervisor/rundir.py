"""The run directory: where a run's spec, lock, WAL, sockets, log and result live
(docs/architecture.md, "Run directory").

    state = state_dir(None)                      # $NKAT_STATE_DIR, XDG, ~/.local/state/...
    run = RunDir.create(state, run_id, spec, config)   # or RunDir.open(state, run_id)
    with run.lock():                             # RunLocked names the holder's pid
        run.removed_temp_files                   # what a crash had left, removed
        writer = run.take_wal_lock(WAL_LOCK_WAIT_S)   # the WAL's writer: journal.lock
        writer.release()                         # before another process writes it
        run.write_status({...})                  # atomic, durable replace
    stored = run.read_status_file()              # .data None: absent, empty or torn;
                                                 # .problem says which, for the operator

Files are written to a temporary sibling, fsynced, renamed and the directory fsynced:
after a power cut a reader finds the old file or the new one, whole. A temporary file
a crash left behind is removed when the run is locked (nothing else writes there).
The directory is private (0700).

Two locks: ``lock`` is the supervisor's, for its whole life; ``journal.lock`` is the WAL
writer's. They differ only under the Ray engine, where the supervisor (the driver) hands
the WAL to a journal actor, a process of its own that may outlive a killed driver for a
moment: whoever opens the WAL next waits for it to let go.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import re
import shutil
import time
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from nkat.protocol.messages import spec_hash

RUN_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")  # whole names only: fullmatch
MAX_IPC_PATH = 107  # sun_path is 108 bytes on Linux, with its terminating NUL
#: How long whoever opens a run's WAL waits for its previous writer to let go of it (a
#: killed Ray driver's journal actor ends within seconds, once Ray sees its owner gone).
WAL_LOCK_WAIT_S = 60.0
#: The temporary siblings atomic_write makes: ``.<name>.<pid>.tmp``.
TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>[0-9]+)\.tmp$")


class RunDirError(RuntimeError):
    """A run directory that cannot be used as asked (missing, malformed, wrong spec)."""


class RunExists(RunDirError):
    """A run of that id is already in the state dir."""


class RunLocked(RunDirError):
    """Another supervisor holds this run."""

    def __init__(self, run_id: str, pid: int | None, why: str | None = None) -> None:
        who = f"supervisor pid {pid}" if pid else "another supervisor"
        super().__init__(f"run {run_id} cannot be started: {why}" if why else
                         f"run {run_id} is already supervised by {who}; "
                         "stop it first (nkat-supervise stop) or pick another run")
        self.pid = pid


def state_dir(explicit: str | os.PathLike[str] | None) -> Path:
    """``--state-dir``, else $NKAT_STATE_DIR, else $XDG_STATE_HOME/nkat-supervise, else ~."""
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get("NKAT_STATE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "state"
    return base / "nkat-supervise"


def check_owned(path: Path) -> None:
    """RunDirError unless ``path`` belongs to this user and nobody else may write into
    it: runs kept where another user can plant or swap files are not safe to resume."""
    st = path.stat()
    if st.st_uid != os.geteuid():
        raise RunDirError(f"{path} belongs to uid {st.st_uid}, not to you (uid "
                          f"{os.geteuid()}): use a state dir of your own (--state-dir)")
    if st.st_mode & 0o022:
        raise RunDirError(f"{path} is writable by others (mode {st.st_mode & 0o777:o}): "
                          f"chmod go-w {path}, or use another --state-dir")


def validate_run_id(run_id: str) -> str:
    if not RUN_ID_RE.fullmatch(run_id) or run_id in (".", ".."):
        raise RunDirError(f"invalid run id {run_id!r}: use 1-64 of A-Z a-z 0-9 . _ -")
    return run_id


def new_run_id(spec: Mapping[str, Any], attempt: int = 1) -> str:
    """``<date>-<time>-<spec hash>``; two runs of one spec started in one second (two
    GPUs, a script) get ``.2``, ``.3`` ... after their ``attempt`` at a free id."""
    base = time.strftime("%Y%m%d-%H%M%S") + "-" + spec_hash(spec)[:6]
    return base if attempt == 1 else f"{base}.{attempt}"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int = 0o600, *, durable: bool = True) -> None:
    """Write to a temporary sibling, fsync, rename over ``path``, fsync the directory.

    ``durable=False`` skips both fsyncs: atomic while the machine stays up (a reader sees
    the old or the new file), but a power cut may leave the new name on an empty file.
    """
    tmp = temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if durable:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


def temp_name(path: Path) -> Path:
    """The temporary sibling atomic_write writes ``path`` through."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@dataclass(frozen=True)
class Stored:
    """A JSON file as read: ``data`` is None when it is absent, empty, torn or not an
    object, and ``problem`` then says which of the last three (None if absent or fine),
    for a reader to show: "status.json is empty (a power cut before it was synced?);
    ignored"."""

    data: dict[str, Any] | None
    problem: str | None = None


def read_json_file(path: Path) -> Stored:
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return Stored(None)
    if not text.strip():
        return Stored(None, f"{path.name} is empty (a crash before it was synced?); ignored")
    try:
        data = json.loads(text)
    except ValueError as exc:
        return Stored(None, f"{path.name} is torn or not JSON ({exc}); ignored")
    if not isinstance(data, dict):
        return Stored(None, f"{path.name} does not hold a JSON object; ignored")
    return Stored(data)


@dataclass(frozen=True)
class RunInfo:
    """What run.toml says about a run."""

    run_id: str
    created: str
    spec: dict[str, Any]
    spec_hash: str
    config: dict[str, Any]
    #: Every array backend the run has computed on, the one it is pinned to last.
    backends: tuple[str, ...] = ()
    #: What a custom job's import needs, as the first start saw it: ``PYTHONPATH`` and
    #: ``cwd`` (a boot, from systemd, has neither).
    job_env: dict[str, str] = field(default_factory=dict)
    #: A sharded run's shards: its unit range cut into [first, stop) pieces, fixed at its
    #: first start (empty: one piece).
    shards: tuple[tuple[int, int], ...] = ()
    #: Whether the run's write-ahead log was made (its first segment durable). A run the
    #: first supervisor created but was killed before it made the log starts one on its
    #: next start; a started log without segments is damage (they were deleted). Runs
    #: from before this key have their log.
    wal_started: bool = True


class RunDir:
    """One run's directory. Creating it writes run.toml once; opening reads it."""

    def __init__(self, path: Path, info: RunInfo) -> None:
        self.path = path
        self.info = info
        #: Temporary files a crash had left, removed when the run was last locked.
        self.removed_temp_files: list[Path] = []

    # Layout ---------------------------------------------------------------------------
    @property
    def run_id(self) -> str:
        return self.info.run_id

    @property
    def wal_dir(self) -> Path:
        return self.path / "wal"

    @property
    def blob_dir(self) -> Path:
        return self.path / "blobs"

    @property
    def sock_dir(self) -> Path:
        return self.path / "sock"

    @property
    def log_dir(self) -> Path:
        return self.path / "logs"

    @property
    def log_file(self) -> Path:
        return self.log_dir / "supervisor.jsonl"

    @property
    def status_file(self) -> Path:
        return self.path / "status.json"

    @property
    def result_file(self) -> Path:
        return self.path / "results" / "result.json"

    def endpoint(self, name: str) -> str:
        return f"ipc://{self.sock_dir / name}"

    def clear_socket(self, name: str) -> None:
        """Before binding ``name``: refuse a path too long for a Unix socket, and remove
        a stale socket a dead supervisor left (the caller holds the run's lock)."""
        path = self.sock_dir / name
        if len(str(path).encode()) > MAX_IPC_PATH:
            raise RunDirError(f"socket path {path} is longer than the {MAX_IPC_PATH} bytes "
                              "a Unix socket allows; use a shorter --state-dir")
        path.unlink(missing_ok=True)

    # Life -------------------------------------------------------------------------------
    @classmethod
    def create(cls, state: Path, run_id: str, spec: Mapping[str, Any],
               config: Mapping[str, Any], job_env: Mapping[str, str] | None = None,
               shards: tuple[tuple[int, int], ...] = ()) -> RunDir:
        """Make the run's directory whole, or not at all: it is built under a temporary
        name (run.toml and the subdirectories, synced) and renamed into place, so that a
        crash never leaves a run without its run.toml. RunExists if the id is taken."""
        validate_run_id(run_id)
        if run_id.startswith("."):
            raise RunDirError(f"invalid run id {run_id!r}: a new run's id may not start "
                              "with a dot")
        runs = state / "runs"
        runs.mkdir(parents=True, exist_ok=True, mode=0o700)
        check_owned(runs)
        path = runs / run_id
        if path.exists():
            raise _exists(path)
        _remove_stale_builds(runs)
        info = RunInfo(run_id, time.strftime("%Y-%m-%dT%H:%M:%S%z"), dict(spec),
                       spec_hash(spec), dict(config), job_env=dict(job_env or {}),
                       shards=shards, wal_started=False)
        building = temp_name(path)
        shutil.rmtree(building, ignore_errors=True)  # a dead process of our pid left it
        building.mkdir(mode=0o700)
        try:
            os.chmod(building, 0o700)
            partial = cls(building, info)
            partial._write_info()
            partial._make_subdirs()
            fsync_dir(building)
            try:
                # Onto a name that exists, rename fails (a run there is never empty).
                os.rename(building, path)
            except OSError as exc:
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    raise _exists(path) from None
                raise
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
        fsync_dir(runs)
        return cls(path, info)

    @classmethod
    def open(cls, state: Path, run_id: str) -> RunDir:
        validate_run_id(run_id)
        path = state / "runs" / run_id
        toml_path = path / "run.toml"
        try:
            data = tomllib.loads(toml_path.read_text())
            info = RunInfo(data["run_id"], data["created"], data["spec"], data["spec_hash"],
                           data.get("config", {}), tuple(data.get("backends", ())),
                           dict(data.get("job_env", {})),
                           tuple((int(a), int(b)) for a, b in data.get("shards", ())),
                           bool(data.get("wal_started", True)))
        except FileNotFoundError:
            raise RunDirError(f"no run {run_id!r} in {state / 'runs'}") from None
        except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError) as exc:
            raise RunDirError(f"run {run_id}: unreadable run.toml: {exc}") from None
        run = cls(path, info)
        run._make_subdirs()
        return run

    def pin_backend(self, backend: str) -> None:
        """Record the array backend the run computes on from now on (its first start
        resolved ``auto``, or an operator switched): run.toml says it, durably, and keeps
        every backend the run has used."""
        used = self.info.backends if self.info.backends[-1:] == (backend,) \
            else (*self.info.backends, backend)
        self.info = dataclasses.replace(self.info, config={**self.info.config,
                                                           "backend": backend}, backends=used)
        self._write_info()

    def mark_wal_started(self) -> None:
        """Record, durably, that the run's log exists: from now on a start that finds
        no segment refuses it as damage rather than making a new log."""
        if not self.info.wal_started:
            self.info = dataclasses.replace(self.info, wal_started=True)
            self._write_info()

    def set_shards(self, shards: tuple[tuple[int, int], ...]) -> None:
        """Fix the run's shards, durably, before any of them is computed (the Ray engine
        cuts a new run once it knows how many nodes the cluster has)."""
        if self.info.shards and self.info.shards != shards:
            raise RunDirError(f"run {self.run_id} is already cut into {len(self.info.shards)} "
                              "shards; they cannot change")
        self.info = dataclasses.replace(self.info, shards=shards)
        self._write_info()

    def _write_info(self) -> None:
        info = self.info
        body = {"run_id": info.run_id, "created": info.created, "spec_hash": info.spec_hash,
                "spec": _toml_safe(info.spec), "config": _toml_safe(info.config),
                "backends": list(info.backends), "job_env": info.job_env}
        if info.shards:
            body["shards"] = [list(span) for span in info.shards]
        if not info.wal_started:
            body["wal_started"] = False
        atomic_write(self.path / "run.toml", tomli_w.dumps(body).encode(), mode=0o600)

    def _make_subdirs(self) -> None:
        for sub in ("wal", "blobs", "sock", "logs", "results"):
            (self.path / sub).mkdir(mode=0o700, exist_ok=True)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run's flock for the life of a supervisor; RunLocked if taken."""
        fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            # holder_pid() probes with a brief shared lock: retry a moment before refusing.
            if not _flock_within(fd, 1.0, 0.02):
                raise RunLocked(self.run_id, self.holder_pid())
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self.removed_temp_files = self.remove_temp_files()
            yield
        finally:
            os.close(fd)  # releases the flock

    def take_wal_lock(self, wait_s: float, on_wait: Any = None) -> WalLock:
        """The WAL writer's flock (``journal.lock``), waiting up to ``wait_s`` for its
        holder to let go (``on_wait(text)`` is told once if it has to wait); RunLocked
        when it does not."""
        path = self.path / "journal.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        waiting = None if on_wait is None else lambda: on_wait(
            f"waiting up to {wait_s:g} s for the previous writer of run {self.run_id}'s "
            "write-ahead log to let go")
        try:
            taken = _flock_within(fd, wait_s, 0.1, waiting)
        except BaseException:
            os.close(fd)
            raise
        if not taken:
            os.close(fd)
            raise RunLocked(self.run_id, None, f"its write-ahead log is still held by another "
                            f"process after {wait_s:g} s ({path}): is another driver's "
                            "journal running?")
        return WalLock(fd)

    def holder_pid(self) -> int | None:
        """The pid of the supervisor holding the lock, or None when nobody holds it."""
        lock_path = self.path / "lock"
        try:
            fd = os.open(lock_path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                text = lock_path.read_text().strip()
                return int(text) if text.isdigit() else None
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def remove_temp_files(self) -> list[Path]:
        """Remove the temporary files of atomic writes a crash interrupted (run.toml,
        status.json, result.json), in the run directory and results/. Only for the
        holder of the lock: nothing else writes there then."""
        removed = []
        for directory in (self.path, self.path / "results"):
            try:
                names = os.listdir(directory)
            except FileNotFoundError:
                continue
            for name in names:
                if TEMP_RE.match(name):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(directory / name)
                        removed.append(directory / name)
        return removed

    def write_status(self, status: Mapping[str, Any]) -> None:
        """Replace status.json atomically and durably: two fsyncs, once a second at most
        from the run loop, so that a power cut leaves the last account whole."""
        atomic_write(self.status_file, json.dumps(status, sort_keys=True, indent=1).encode())

    def read_status_file(self) -> Stored:
        return read_json_file(self.status_file)

    def read_status(self) -> dict[str, Any] | None:
        """status.json, or None when it is absent, empty or torn (read_status_file says
        which)."""
        return self.read_status_file().data

    def write_result(self, result: Mapping[str, Any]) -> None:
        text = json.dumps(result, sort_keys=True, indent=2) + "\n"
        atomic_write(self.result_file, text.encode(), mode=0o644)

    def read_result_file(self) -> Stored:
        return read_json_file(self.result_file)

    def read_result(self) -> dict[str, Any] | None:
        """result.json, or None when it is absent, empty or torn (read_result_file says
        which)."""
        return self.read_result_file().data


def _flock_within(fd: int, wait_s: float, poll_s: float, on_wait: Any = None) -> bool:
    """An exclusive flock on ``fd``, retried every ``poll_s`` for up to ``wait_s``; False
    if its holder kept it. ``on_wait()`` is called once, when it has to wait."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
        if time.monotonic() > deadline:
            return False
        if on_wait is not None:
            on_wait()
            on_wait = None
        time.sleep(poll_s)


class WalLock:
    """A held ``journal.lock`` (see ``RunDir.take_wal_lock``)."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def release(self) -> None:
        """Let go (once; later calls do nothing)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _exists(path: Path) -> RunExists:
    if (path / "run.toml").exists():
        return RunExists(f"run {path.name} already exists in {path.parent}")
    return RunExists(f"{path} exists but holds no run.toml (not a run this tool made whole): "
                     "move it away or pick another run id")


def _remove_stale_builds(runs: Path) -> None:
    """Remove run directories whose building a crash cut short (``.<id>.<pid>.tmp`` of a
    process that is gone): never renamed into place, they were no run yet."""
    for entry in os.listdir(runs):
        match = TEMP_RE.match(entry)
        if match and not _alive(int(match["pid"])):
            shutil.rmtree(runs / entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    return True


def list_runs(state: Path) -> list[RunDir]:
    """Every readable run under ``state``, oldest first."""
    runs_dir = state / "runs"
    if not runs_dir.is_dir():
        return []
    found = []
    for entry in sorted(runs_dir.iterdir()):
        if not RUN_ID_RE.fullmatch(entry.name) or TEMP_RE.match(entry.name) \
                or not (entry / "run.toml").exists():
            continue
        try:
            found.append(RunDir.open(state, entry.name))
        except RunDirError:
            continue
    found.sort(key=lambda r: (r.info.created, r.run_id))
    return found


def _toml_safe(value: Any) -> Any:
    """TOML has no null: drop None values (absent means the default, which is null)."""
    if isinstance(value, dict):
        return {k: _toml_safe(v) for k, v in value.items() if v is not None}
    return value
