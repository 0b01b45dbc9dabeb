"""Atomic file writes and the pool that encodes and writes while the next batch computes."""

from __future__ import annotations

import io
import os
import stat
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np

from camcli.errors import OutputError


def cannot_write(path: str | Path, e: OSError) -> OutputError:
    """The error for a file that could not be written: names the path and the reason."""
    return OutputError(f"cannot write {str(path)!r}: {e.strerror or e}")


def _write_all(f: BinaryIO, data: bytes) -> None:
    f.write(data)


_mode_lock = threading.Lock()
_mode: int | None = None


def file_mode() -> int:
    """The mode a new file gets from the umask (0o644 under umask 022), read once per process.

    mkstemp creates files 0600 whatever the umask; outputs are chmod-ed to this before the rename,
    like any file the user writes. ``reset_file_mode()`` makes the next call read the umask again.
    """
    global _mode
    with _mode_lock:
        if _mode is None:
            mask = _proc_umask()
            if mask is None:  # no /proc: set and restore, once, under the lock
                mask = os.umask(0o022)
                os.umask(mask)
            _mode = 0o666 & ~mask
        return _mode


def reset_file_mode() -> None:
    global _mode
    with _mode_lock:
        _mode = None


def _proc_umask() -> int | None:
    """Linux reports the umask in /proc/self/status without changing it (no race with other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return None


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half a file.

    The file gets the umask's mode (see file_mode). Any OSError (a full disk, a folder gone
    read-only) becomes an OutputError naming the path.
    """
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".part", dir=p.parent)
    except OSError as e:
        raise cannot_write(p, e) from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), file_mode())
            _write_all(f, data)
        os.replace(tmp, p)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError):
            raise cannot_write(p, e) from None
        raise


def write_report(path: str | Path, data: bytes) -> None:
    """Write a file the user named (a report): a regular file (or a new one) is replaced atomically;
    a symbolic link keeps being a link, its target replaced atomically (or written through when the
    target is no regular file); a named pipe, a device or ``/dev/stdout`` is written through, as a
    shell's ``>`` would. A folder is refused (OutputError)."""
    p = Path(path)
    target = Path(os.path.realpath(p)) if p.is_symlink() else p
    try:
        st = os.stat(target)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise cannot_write(p, e) from None
    if st is None or stat.S_ISREG(st.st_mode):
        write_atomic(target, data)
        return
    if stat.S_ISDIR(st.st_mode):
        raise OutputError(f"cannot write {str(p)!r}: it is a folder")
    try:  # a FIFO waits for its reader here, as it would for any writer
        with open(target, "wb") as f:
            f.write(data)
    except OSError as e:
        raise cannot_write(p, e) from None


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


class WriterPool:
    """A bounded thread pool: OpenCV's encoder releases the GIL, so writes overlap compute.

    At most ``max_pending`` tasks are in flight; ``submit`` waits for the oldest beyond that, which
    keeps memory flat however many images a run has.
    """

    def __init__(self, workers: int = 2, max_pending: int = 64) -> None:
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="camcli-writer")
        self._pending: list[Future[Any]] = []
        self._max = max(1, max_pending)
        self._error: BaseException | None = None

    def _done(self, fut: Future[Any]) -> None:
        if self._error is None and not fut.cancelled() and fut.exception() is not None:
            self._error = fut.exception()

    def check(self) -> None:
        """Raise the first error a write has hit, so the run stops at once instead of computing on."""
        if self._error is not None:
            raise self._error

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        self.check()
        while len(self._pending) >= self._max:
            self._pending.pop(0).result()
        fut = self._pool.submit(fn, *args)
        fut.add_done_callback(self._done)
        self._pending.append(fut)
        return fut

    def drain(self) -> None:
        while self._pending:
            self._pending.pop(0).result()
        self.check()

    def close(self, cancel: bool = False) -> None:
        self._pool.shutdown(wait=True, cancel_futures=cancel)
        self._pending.clear()

    def __enter__(self) -> "WriterPool":
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.close(cancel=exc_type is not None)
