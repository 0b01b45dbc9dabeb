"""The output folder: one run at a time, checked before any work.

A run holds ``.camcli.lock`` in its output folder for as long as it writes there: an exclusive
``flock`` on the file, plus a record of who holds it (PID, host, start time, command) so that a
second run can say which run is in its way. The kernel drops a ``flock`` when its process dies,
so a lock file left behind by a killed run is simply taken over (and the caller is told whose it
was). Shards of one job array (``--shard K/N``) write into one folder side by side: each holds a
shared lock on ``.camcli.lock`` and an exclusive one on ``.camcli.shard-K-of-N.lock``, so shards
do not block each other, but two runs of the same shard do, and a whole-folder run waits for none.
A ``flock`` belongs to the open file, which a forked child (a DataLoader worker) shares: the lock
would outlive a killed run in its children. So every forked child closes the lock descriptors at
once (``os.register_at_fork``; closing a shared descriptor leaves the parent's lock in place), and
exec-ed programs never get them (``O_CLOEXEC``). A run that takes over a killed run's folder
removes the ``.*.part`` files the killed writes left.
On file systems without ``flock`` the record alone decides: a record of a live process on this
host, or of any process on another host, holds the folder.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from camcli.errors import UsageError

LOCK_NAME = ".camcli.lock"
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def check_writable(out: Path) -> None:
    """--out exists (created if needed) and a file can be created in it: exit 2 otherwise."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".camcli-write-test-"):
            pass
    except OSError as e:
        raise UsageError(f"--out {str(out)!r} cannot be written: {e.strerror or e}") from None


def shard_suffix(shard: tuple[int, int] | None) -> str:
    """'' for a whole run, '.shard-K-of-N' for one shard: the suffix of its records and summary."""
    return "" if shard is None else ".shard-{}-of-{}".format(*shard)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by someone else
    return True


def describe(holder: dict[str, Any]) -> str:
    """'pid 123 on host, started 2024-05-01 12:00:00 (camcli explain)' from a lock record."""
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    what = f" ({holder['command']})" if holder.get("command") else ""
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {when}{what}"


def read_holder(path: Path) -> dict[str, Any] | None:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return None
    try:
        rec = json.loads(text)
    except json.JSONDecodeError:
        return None
    return rec if isinstance(rec, dict) else None


_HELD_FDS: set[int] = set()  # lock descriptors this process holds; closed in every forked child


def _close_in_child() -> None:
    for fd in _HELD_FDS:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_FDS.clear()


os.register_at_fork(after_in_child=_close_in_child)


def remove_stale_parts(out: Path) -> int:
    """Remove the temporary ``.*.part`` files under ``out`` that writes of a killed run left (only
    while holding the folder exclusively: then no write of another run is in flight). Returns how many."""
    removed = 0
    for folder, dirs, files in os.walk(out):
        for name in files:
            if name.startswith(".") and name.endswith(".part"):
                try:
                    os.unlink(os.path.join(folder, name))
                    removed += 1
                except OSError:
                    pass
    return removed


@dataclass
class _Held:
    path: Path
    fd: int
    exclusive: bool
    flock: bool  # False: the file system has no flock; the record alone holds the folder


def _acquire(path: Path, exclusive: bool) -> _Held | None:
    """Lock ``path`` without waiting; None when another process holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError as e:
            if e.errno not in _NO_FLOCK:
                os.close(fd)
                raise
            _HELD_FDS.add(fd)
            return _Held(path, fd, exclusive, flock=False)
        # The previous holder may have removed the file between our open and our lock: then we
        # hold a lock on a file nobody else can find. Lock the file that is there now instead.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            _HELD_FDS.add(fd)
            return _Held(path, fd, exclusive, flock=True)
        os.close(fd)


def _release(held: _Held) -> None:
    try:
        if held.exclusive:
            os.unlink(held.path)
        else:  # a shared lock: remove the file only when no other shard holds it
            try:
                fcntl.flock(held.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.unlink(held.path)
            except OSError:
                pass
    except FileNotFoundError:
        pass
    finally:
        _HELD_FDS.discard(held.fd)
        os.close(held.fd)


class OutputLock:
    """The lock a run holds on its output folder; a context manager.

    ``previous`` is the record a run that died while holding the folder left behind (taken over),
    or None.
    """

    def __init__(self, out: Path, command: str, shard: tuple[int, int] | None = None) -> None:
        self.out = Path(out)
        self.command = command
        self.shard = shard
        self.previous: dict[str, Any] | None = None
        self._held: list[_Held] = []

    @property
    def record_path(self) -> Path:
        return self.out / (LOCK_NAME if self.shard is None else f".camcli{shard_suffix(self.shard)}.lock")

    def _busy(self, path: Path) -> UsageError:
        holders = [h for h in [read_holder(path)] if h]
        if not holders and path.name == LOCK_NAME:  # held shared by shards: each names itself
            holders = [h for p in sorted(self.out.glob(".camcli.shard-*.lock")) if (h := read_holder(p))]
        who = "; ".join(describe(h) for h in holders) or "a run whose record is not readable yet"
        return UsageError(
            f"--out {str(self.out)!r} is in use by another camcli run ({who}); wait for it to finish, "
            "or choose another --out"
        )

    def acquire(self) -> "OutputLock":
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            self._take(self.out / LOCK_NAME, exclusive=self.shard is None)
            if self.shard is not None:
                self._take(self.record_path, exclusive=True)
            self._write_record(self._held[-1])
        except OSError as e:
            self.release()
            raise UsageError(f"--out {str(self.out)!r} cannot be locked: {e.strerror or e}") from None
        except BaseException:
            self.release()
            raise
        return self

    def _take(self, path: Path, exclusive: bool) -> None:
        held = _acquire(path, exclusive)
        if held is None:
            raise self._busy(path)
        old = read_holder(path) if exclusive else None
        if old and not held.flock and old.get("pid") != os.getpid():
            same_host = old.get("host") == socket.gethostname()
            if not same_host or (isinstance(old.get("pid"), int) and _pid_alive(old["pid"])):
                _HELD_FDS.discard(held.fd)
                os.close(held.fd)  # not ours: leave the holder's record alone
                raise self._busy(path)
        if old and old.get("pid") != os.getpid():
            self.previous = old  # a run that ended without releasing the folder (killed)
        self._held.append(held)

    def _write_record(self, held: _Held) -> None:
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "command": self.command}
        data = (json.dumps(record) + "\n").encode()
        os.ftruncate(held.fd, 0)
        os.pwrite(held.fd, data, 0)

    def release(self) -> None:
        while self._held:
            _release(self._held.pop())

    def __enter__(self) -> "OutputLock":
        return self if self._held else self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def locked(out: Path, command: str, shard: tuple[int, int] | None = None,
           warn: Callable[[str], None] | None = None) -> OutputLock:
    """Acquire the output folder's lock (UsageError naming the holder when busy); warn when a
    killed run's lock was taken over."""
    lock = OutputLock(out, command, shard).acquire()
    if lock.previous is not None:
        parts = remove_stale_parts(lock.out) if shard is None else 0
        if warn is not None:
            left = f"; removed {parts} unfinished .part files it left" if parts else ""
            warn(f"took over {str(lock.record_path)!r} from a run that ended without releasing it "
                 f"({describe(lock.previous)}){left}")
    return lock
