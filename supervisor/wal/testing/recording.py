"""An in-memory file system that records every operation and rebuilds crash states.

It implements FileIO, so a Wal runs on it unchanged; tests inject errors with
``fail_next`` and ask ``crash_states()`` for every disk a power loss could have left.

    io = RecordingIO()
    wal = Wal.open(Path("/run/wal"), Path("/run/blobs"), run=spec, io=io)
    ...
    for state in io.crash_states():
        Wal.open(Path("/run/wal"), Path("/run/blobs"), io=RecordingIO(state.image))

The durability model, deliberately no kinder than POSIX and a journaling file system:

- A write, a fallocate or an O_TRUNC changes the file's contents in memory; it reaches
  the disk at the file's next successful fsync or fdatasync (both persist data and the
  size needed to read it). Until then it may or may not persist, independently of the
  other pending writes, and the last one may be torn at sector boundaries.
- A failed fsync leaves the writes it covered in limbo: never made durable by a later
  sync (Linux may have dropped the dirty pages), but possibly on disk anyway.
- Creating, renaming or unlinking a name (and mkdir) reaches the disk when its directory
  is fsynced; until then each may or may not persist. A rename moves the inode it
  named when it ran. Nothing makes a new file's name durable but fsync of its directory.
- Reads see the process's view: everything written, synced or not.
"""

from __future__ import annotations

import errno as errnos
import functools
import itertools
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

#: Directory entry value of a subdirectory (files map to their inode number, >= 0).
DIR = -1

_INODE_OPS = frozenset({"write", "extend", "truncate"})
_SYNC_OPS = frozenset({"fsync", "fdatasync"})
_DIR_OPS = frozenset({"link", "mkdir", "rename", "unlink"})


@functools.lru_cache(maxsize=1 << 14)
def _parsed(path: str) -> tuple[PurePosixPath, PurePosixPath, str]:
    """A path, its parent and its name, parsed once per distinct string: pathlib parses
    on every construction, and the same few paths come back on every operation. The
    parent is the very object ``_pure`` gives for it, so dict lookups find it by
    identity."""
    pure = PurePosixPath(path)
    parent = pure.parent
    if parent != pure:  # the root (or ".") is its own parent
        parent = _parsed(str(parent))[0]
    return pure, parent, pure.name


def _pure(path: Path | PurePosixPath) -> PurePosixPath:
    """``PurePosixPath(path)``, from the cache."""
    return _parsed(os.fspath(path))[0]


def _parent(path: PurePosixPath) -> PurePosixPath:
    """``path.parent``, from the cache."""
    return _parsed(str(path))[1]


def _name(path: PurePosixPath) -> str:
    """``path.name``, from the cache."""
    return _parsed(str(path))[2]


@functools.lru_cache(maxsize=1 << 14)
def _child(directory: PurePosixPath, name: str) -> PurePosixPath:
    """``directory / name``, built once, with its parsing cached as well."""
    return _pure(directory / name)


ROOT = _parsed("/")[0]


@dataclass(frozen=True)
class Op:
    """One recorded operation. ``path`` is the file (or, for directory operations, the
    entry) it concerns; ``ino`` the inode; ``dst`` a rename's target."""

    index: int
    kind: str
    path: PurePosixPath
    ino: int = DIR
    offset: int = 0
    size: int = 0
    data: bytes = field(default=b"", repr=False)
    dst: PurePosixPath | None = None
    failed: bool = False

    @functools.cached_property
    def directory(self) -> PurePosixPath:
        """The directory whose fsync makes this directory operation durable."""
        return _parent(self.path)

    @functools.cached_property
    def name(self) -> str:
        """The name of ``path`` in that directory."""
        return _name(self.path)


@dataclass(frozen=True)
class Image:
    """The contents of a file system: each directory's entries and each inode's bytes.
    Directories and inodes that no path reaches are ignored."""

    dirs: Mapping[PurePosixPath, Mapping[str, int]]
    files: Mapping[int, bytes]

    def walk(self) -> Iterator[tuple[PurePosixPath, int]]:
        """Every reachable path with its inode (DIR for directories), parents first."""
        stack = [ROOT]
        while stack:
            directory = stack.pop()
            for name, ino in sorted(self.dirs.get(directory, {}).items()):
                path = _child(directory, name)
                yield path, ino
                if ino == DIR:
                    stack.append(path)

    def read(self, path: Path | PurePosixPath) -> bytes:
        """The bytes of a reachable file; FileNotFoundError otherwise."""
        path = _pure(path)
        for found, ino in self.walk():
            if found == path and ino != DIR:
                return self.files.get(ino, b"")
        raise FileNotFoundError(errnos.ENOENT, "no such file in image", str(path))

    def replace(self, path: Path | PurePosixPath, data: bytes) -> Image:
        """A copy with one existing file's contents replaced (for damage tests)."""
        path = _pure(path)
        ino = self.dirs.get(_parent(path), {}).get(_name(path))
        if ino is None or ino == DIR:
            raise FileNotFoundError(errnos.ENOENT, "no such file in image", str(path))
        return Image(self.dirs, {**self.files, ino: bytes(data)})

    def key(self) -> tuple[tuple[PurePosixPath, bytes | None], ...]:
        """Equal for images that hold the same paths with the same contents."""
        return tuple((p, None if ino == DIR else self.files.get(ino, b""))
                     for p, ino in self.walk())


@dataclass
class _Fault:
    kind: str
    err: int
    suffix: str
    skip: int  # matching operations still to let through


F = TypeVar("F", bound=Callable[..., Any])


def _locked(method: F) -> F:
    """One operation at a time: a Wal may prepare segments in a thread of its own."""
    @functools.wraps(method)
    def wrapper(self: RecordingIO, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)
    return wrapper  # type: ignore[return-value]


@dataclass(frozen=True)
class CrashState:
    """A disk a power loss could leave: ``point`` operations had returned (ops[:point]),
    ``label`` says which pending changes persisted."""

    point: int
    label: str
    image: Image


class RecordingIO:
    """FileIO on an in-memory file system (absolute POSIX paths), recording each
    mutating or syncing operation in ``ops``."""

    def __init__(self, image: Image | None = None) -> None:
        self._lock = threading.Lock()
        self._dirs: dict[PurePosixPath, dict[str, int]] = {ROOT: {}}
        self._files: dict[int, bytearray] = {}
        if image is not None:
            for path, ino in image.walk():
                self._dirs[_parent(path)][_name(path)] = ino
                if ino == DIR:
                    self._dirs[path] = {}
                else:
                    self._files[ino] = bytearray(image.files.get(ino, b""))
        self._base = self.image()
        self._next_ino = max(self._files, default=0) + 1
        self._fds: dict[int, tuple[int, PurePosixPath, bool]] = {}
        self._next_fd = 3
        self._faults: list[_Fault] = []
        self.ops: list[Op] = []

    # Test controls ------------------------------------------------------------------

    @_locked
    def fail_next(self, kind: str, err: int, path_suffix: str = "", after: int = 0) -> None:
        """Make a ``kind`` operation ("open", "write", "fallocate", "fsync", "fdatasync",
        "rename", "unlink", "mkdir", "fsync_dir") on a path ending with ``path_suffix``
        raise OSError(err): the next one after ``after`` such operations succeeded. A
        failed write changes nothing; a failed sync leaves its writes in limbo."""
        self._faults.append(_Fault(kind, err, path_suffix, after))

    @_locked
    def image(self) -> Image:
        """What the process sees now (the disk after a clean exit, no power loss)."""
        return Image({d: dict(e) for d, e in self._dirs.items()},
                     {ino: bytes(data) for ino, data in self._files.items()})

    @_locked
    def crash_states(self, *, subset: int = 4, sectors: Iterable[int] = (512, 4096),
                     tears: int = 8, since: int = 0) -> list[CrashState]:
        """Every distinct disk a power loss after each recorded operation could leave.

        At each point: nothing pending persisted; everything did; each subset of the
        last ``subset`` pending writes (earlier pending writes all kept, or all lost);
        the last write torn at ``sectors`` boundaries (up to ``tears`` cut points, the
        part before or the part after the cut persisted); each subset of the pending
        directory operations (a prefix when there are more than ``subset``). An image
        reachable from several points is returned once, with the latest point, where
        the most has been acknowledged.

        ``since``: only the states whose point is ``since`` or later, exactly those of
        the full list (earlier points are walked, not enumerated).
        """
        latest: dict[object, CrashState] = {}
        for state in self._enumerate(subset, tuple(sectors), tears, since):
            latest.pop(key := state.image.key(), None)
            latest[key] = state
        return sorted(latest.values(), key=lambda s: s.point)

    # FileIO -------------------------------------------------------------------------

    @_locked
    def open(self, path: Path, flags: int) -> int:
        p = self._check("open", path)
        entries = self._dir_of(p)
        name = _name(p)
        ino = entries.get(name)
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        if ino == DIR:
            raise IsADirectoryError(errnos.EISDIR, os.strerror(errnos.EISDIR), str(p))
        if ino is None:
            if not flags & os.O_CREAT:
                raise FileNotFoundError(errnos.ENOENT, os.strerror(errnos.ENOENT), str(p))
            ino = self._next_ino
            self._next_ino += 1
            self._files[ino] = bytearray()
            entries[name] = ino
            self._record("link", p, ino=ino)
        elif flags & os.O_CREAT and flags & os.O_EXCL:
            raise FileExistsError(errnos.EEXIST, os.strerror(errnos.EEXIST), str(p))
        elif flags & os.O_TRUNC and writable:
            self._files[ino] = bytearray()
            self._record("truncate", p, ino=ino, size=0)
        fd = self._next_fd
        self._next_fd += 1
        self._fds[fd] = (ino, p, writable)
        return fd

    @_locked
    def close(self, fd: int) -> None:
        self._fd(fd)
        del self._fds[fd]

    @_locked
    def pread(self, fd: int, size: int, offset: int) -> bytes:
        ino, _, _ = self._fd(fd)
        return bytes(self._files[ino][offset:offset + size])

    @_locked
    def pwrite(self, fd: int, data: bytes, offset: int) -> None:
        ino, path, writable = self._fd(fd)
        self._check("write", path)
        if not writable:
            raise OSError(errnos.EBADF, os.strerror(errnos.EBADF), str(path))
        _write(self._files[ino], offset, data)
        self._record("write", path, ino=ino, offset=offset, data=bytes(data))

    @_locked
    def fallocate(self, fd: int, offset: int, length: int) -> None:
        ino, path, _ = self._fd(fd)
        self._check("fallocate", path)
        content = self._files[ino]
        if len(content) < offset + length:
            content.extend(bytes(offset + length - len(content)))
        self._record("extend", path, ino=ino, size=offset + length)

    @_locked
    def fdatasync(self, fd: int) -> None:
        self._sync("fdatasync", fd)

    @_locked
    def fsync(self, fd: int) -> None:
        self._sync("fsync", fd)

    @_locked
    def read_file(self, path: Path) -> bytes:
        return bytes(self._files[self._file_ino(_pure(path))])

    @_locked
    def read_range(self, path: Path, offset: int, length: int) -> bytes:
        content = self._files[self._file_ino(_pure(path))]
        return bytes(content[offset:offset + length])

    @_locked
    def size(self, path: Path) -> int:
        return len(self._files[self._file_ino(_pure(path))])

    @_locked
    def exists(self, path: Path) -> bool:
        p = _pure(path)
        return p == ROOT or _name(p) in self._dirs.get(_parent(p), {})

    @_locked
    def listdir(self, path: Path) -> list[str]:
        p = _pure(path)
        if p not in self._dirs:
            raise FileNotFoundError(errnos.ENOENT, os.strerror(errnos.ENOENT), str(p))
        return sorted(self._dirs[p])

    @_locked
    def mkdir(self, path: Path) -> None:
        p = self._check("mkdir", path)
        entries = self._dir_of(p)
        if _name(p) in entries:
            raise FileExistsError(errnos.EEXIST, os.strerror(errnos.EEXIST), str(p))
        entries[_name(p)] = DIR
        self._dirs[p] = {}
        self._record("mkdir", p)

    @_locked
    def rename(self, src: Path, dst: Path) -> None:
        s, d = self._check("rename", src), _pure(dst)
        if _parent(s) != _parent(d):
            raise OSError(errnos.EXDEV, "RecordingIO renames within one directory", str(s))
        ino = self._file_ino(s)
        entries = self._dirs[_parent(s)]
        del entries[_name(s)]
        entries[_name(d)] = ino
        self._record("rename", s, ino=ino, dst=d)

    @_locked
    def unlink(self, path: Path) -> None:
        p = self._check("unlink", path)
        self._file_ino(p)
        del self._dirs[_parent(p)][_name(p)]
        self._record("unlink", p)

    @_locked
    def fsync_dir(self, path: Path) -> None:
        p = self._check("fsync_dir", path)
        if p not in self._dirs:
            raise FileNotFoundError(errnos.ENOENT, os.strerror(errnos.ENOENT), str(p))
        self._record("fsync_dir", p)

    # Internals ----------------------------------------------------------------------

    def _check(self, kind: str, path: Path | PurePosixPath) -> PurePosixPath:
        """Raise an armed fault for this operation, if any."""
        p = _pure(path)
        for fault in self._faults:
            if fault.kind == kind and str(p).endswith(fault.suffix):
                if fault.skip:
                    fault.skip -= 1
                    continue
                self._faults.remove(fault)
                raise OSError(fault.err, os.strerror(fault.err), str(p))
        return p

    def _sync(self, kind: str, fd: int) -> None:
        ino, path, _ = self._fd(fd)
        try:
            self._check(kind, path)
        except OSError:
            self._record(kind, path, ino=ino, failed=True)
            raise
        self._record(kind, path, ino=ino)

    def _record(self, kind: str, path: PurePosixPath, *, ino: int = DIR, offset: int = 0,
                size: int = 0, data: bytes = b"", dst: PurePosixPath | None = None,
                failed: bool = False) -> None:
        self.ops.append(Op(len(self.ops), kind, path, ino, offset, size, data, dst, failed))

    def _fd(self, fd: int) -> tuple[int, PurePosixPath, bool]:
        try:
            return self._fds[fd]
        except KeyError:
            raise OSError(errnos.EBADF, os.strerror(errnos.EBADF)) from None

    def _dir_of(self, path: PurePosixPath) -> dict[str, int]:
        if not path.is_absolute():
            raise ValueError(f"RecordingIO needs absolute paths, got {path}")
        try:
            return self._dirs[_parent(path)]
        except KeyError:
            raise FileNotFoundError(errnos.ENOENT, os.strerror(errnos.ENOENT),
                                    str(path)) from None

    def _file_ino(self, path: PurePosixPath) -> int:
        ino = self._dir_of(path).get(_name(path))
        if ino is None:
            raise FileNotFoundError(errnos.ENOENT, os.strerror(errnos.ENOENT), str(path))
        if ino == DIR:
            raise IsADirectoryError(errnos.EISDIR, os.strerror(errnos.EISDIR), str(path))
        return ino

    def _enumerate(self, subset: int, sectors: tuple[int, ...], tears: int,
                   since: int) -> Iterator[CrashState]:
        """Walk the operations once, keeping what is durable so far and what is
        pending, and yield the crash states before each operation and after the last,
        from point ``since`` on."""
        dirs = {d: dict(e) for d, e in self._base.dirs.items()}
        files = dict(self._base.files)
        pending: list[Op] = []  # inode changes not yet covered by a successful sync
        limbo: set[int] = set()  # indices of those a failed sync covered
        pending_dir: list[Op] = []
        for point in range(len(self.ops) + 1):
            if point >= since:
                for label, chosen, chosen_dir in _variants(pending, pending_dir, subset,
                                                           sectors, tears):
                    yield CrashState(point, label,
                                     _build(dirs, files, chosen, chosen_dir))
            if point == len(self.ops):
                return
            op = self.ops[point]
            if op.kind in _INODE_OPS:
                pending.append(op)
            elif op.kind in _SYNC_OPS:
                mine = [o for o in pending if o.ino == op.ino and o.index not in limbo]
                if op.failed:
                    limbo.update(o.index for o in mine)
                else:
                    files[op.ino] = _apply_inode(files.get(op.ino, b""), mine)
                    done = {o.index for o in mine}
                    pending = [o for o in pending if o.index not in done]
            elif op.kind in _DIR_OPS:
                pending_dir.append(op)
            elif op.kind == "fsync_dir":
                mine = [o for o in pending_dir if o.directory == op.path]
                # A new mapping, not an update: images already yielded share the old one.
                dirs = {d: dict(e) for d, e in dirs.items()}
                _apply_dir(dirs, mine)
                pending_dir = [o for o in pending_dir if o.directory != op.path]


def _write(content: bytearray, offset: int, data: bytes) -> None:
    if len(content) < offset:
        content.extend(bytes(offset - len(content)))
    content[offset:offset + len(data)] = data


def _apply_inode(content: bytes, ops: Iterable[Op]) -> bytes:
    out = bytearray(content)
    for op in ops:
        if op.kind == "write":
            _write(out, op.offset, op.data)
        elif op.kind == "extend":
            if len(out) < op.size:
                out.extend(bytes(op.size - len(out)))
        else:  # truncate
            del out[op.size:]
    return bytes(out)


def _apply_dir(dirs: dict[PurePosixPath, dict[str, int]], ops: Iterable[Op]) -> None:
    for op in ops:
        entries = dirs.setdefault(op.directory, {})
        name = op.name
        if op.kind == "link":
            entries[name] = op.ino
        elif op.kind == "mkdir":
            entries[name] = DIR
            dirs.setdefault(op.path, {})
        elif op.kind == "unlink":
            entries.pop(name, None)
        else:  # rename: the inode it moved when it ran, whatever the name holds now
            assert op.dst is not None
            if entries.get(name) == op.ino:
                del entries[name]
            entries[_name(op.dst)] = op.ino


def _build(dirs: dict[PurePosixPath, dict[str, int]], files: dict[int, bytes],
           chosen: list[Op], chosen_dir: list[Op]) -> Image:
    out_files = dict(files)
    by_ino: dict[int, list[Op]] = {}
    for op in chosen:
        by_ino.setdefault(op.ino, []).append(op)
    for ino, ops in by_ino.items():
        out_files[ino] = _apply_inode(files.get(ino, b""), ops)
    if chosen_dir:
        out_dirs = {d: dict(e) for d, e in dirs.items()}
        _apply_dir(out_dirs, chosen_dir)
    else:
        out_dirs = dirs
    return Image(out_dirs, out_files)


def _variants(pending: list[Op], pending_dir: list[Op], subset: int,
              sectors: tuple[int, ...],
              tears: int) -> Iterator[tuple[str, list[Op], list[Op]]]:
    """(label, inode changes that persisted, directory changes that persisted)."""
    writes: list[tuple[str, list[Op]]] = [("none", []), ("all", pending)]
    head, tail = pending[:-subset], pending[-subset:]
    for kept_head in ([], head) if head else ([],):
        for n in range(1, len(tail)):
            for combo in itertools.combinations(tail, n):
                label = f"head {'kept' if kept_head else 'lost'}, kept {[o.index for o in combo]}"
                writes.append((label, kept_head + list(combo)))
    if pending and pending[-1].kind == "write":
        last = pending[-1]
        for cut in _cuts(last, sectors, tears):
            split = cut - last.offset
            before = Op(last.index, "write", last.path, last.ino, last.offset,
                        data=last.data[:split])
            after = Op(last.index, "write", last.path, last.ino, cut, data=last.data[split:])
            writes.append((f"op {last.index} torn at {cut}, head kept", pending[:-1] + [before]))
            writes.append((f"op {last.index} torn at {cut}, tail kept", pending[:-1] + [after]))
    dir_sets: list[tuple[str, list[Op]]] = [("none", []), ("all", pending_dir)]
    if len(pending_dir) <= subset:
        for n in range(1, len(pending_dir)):
            for combo in itertools.combinations(pending_dir, n):
                dir_sets.append((f"dir ops {[o.index for o in combo]}", list(combo)))
    else:
        for n in range(1, len(pending_dir)):
            dir_sets.append((f"dir ops prefix {n}", pending_dir[:n]))
    for wlabel, chosen in writes:
        for dlabel, chosen_dir in dir_sets[:2]:
            yield f"writes {wlabel}; dir ops {dlabel}", chosen, chosen_dir
    for dlabel, chosen_dir in dir_sets[2:]:
        for wlabel, chosen in writes[:2]:
            yield f"writes {wlabel}; {dlabel}", chosen, chosen_dir


def _cuts(op: Op, sectors: tuple[int, ...], tears: int) -> list[int]:
    """Sector boundaries strictly inside a write, at most ``tears`` of them, spread."""
    end = op.offset + len(op.data)
    cuts = sorted({c for s in sectors
                   for c in range((op.offset // s + 1) * s, end, s)})
    if len(cuts) > tears:
        step = len(cuts) / tears
        cuts = [cuts[int(i * step)] for i in range(tears)]
    return cuts
