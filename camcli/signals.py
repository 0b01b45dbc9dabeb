"""Signals and the processes a run starts: stopping in order, and nothing left behind.

SIGINT (Ctrl-C), SIGTERM (``kill``, a Slurm time limit, ``docker stop``) and SIGHUP (the terminal
closed) all take one path: the main thread gets an :class:`Interrupted` (a KeyboardInterrupt), the
run finishes the writes in flight, writes its summary, releases its lock and exits with 128 + the
signal's number (130, 143, 129), the shell's convention. A second signal during that cleanup exits
at once. SIGKILL cannot be caught: what protects a run from it is that its decoding workers die
with it (:func:`worker_init`) and hold no lock (camcli.outdir closes lock descriptors in forked
children).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from types import FrameType
from typing import Iterator

STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1
WATCH_INTERVAL = 1.0  # seconds between a worker's checks that its parent is still there


class Interrupted(KeyboardInterrupt):
    """A stop signal, raised in the main thread; ``exit_code`` is 128 + its number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


def exit_code(e: KeyboardInterrupt) -> int:
    """130 for a plain KeyboardInterrupt, 128 + the signal's number for an Interrupted."""
    return e.exit_code if isinstance(e, Interrupted) else 128 + signal.SIGINT


class _Handler:
    """Raises Interrupted on the first stop signal; on a second one, stops the workers and exits."""

    def __init__(self) -> None:
        self.seen: int | None = None

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.seen is not None:
            os.write(2, b"\ncamcli: interrupted again; stopping now (a file being written may remain as .*.part)\n")
            for child in multiprocessing.active_children():  # decoding workers
                child.terminate()
            os._exit(128 + self.seen)
        self.seen = signum
        raise Interrupted(signum)


@contextmanager
def stop_on_signals() -> Iterator[_Handler]:
    """While the block runs (in the main thread), SIGINT, SIGTERM and SIGHUP raise Interrupted.

    The previous handlers come back on the way out, except after a signal: then the stop signals
    stay ignored, so that one more while Python shuts down does not turn the documented exit code
    into a death by signal. A signal the process was started with ignored stays ignored: under
    ``nohup`` (SIGHUP) or as a shell's background job (SIGINT) it is not meant to stop the run."""
    handler = _Handler()
    saved = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    taken = [s for s in STOP_SIGNALS if saved[s] is not signal.SIG_IGN]
    for s in taken:
        signal.signal(s, handler)
    try:
        yield handler
    finally:
        for s in taken:
            signal.signal(s, signal.SIG_IGN if handler.seen is not None else saved[s])


def _die_with_parent(parent: int) -> None:
    """Ask Linux to SIGKILL this process when its parent dies; elsewhere (or if prctl is refused)
    a thread watches the parent's pid. Both: the parent may already be gone before either starts."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before the request was made
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(WATCH_INTERVAL)
        os._exit(1)  # no cleanup: a queue's feeder thread would wait on a pipe nobody reads

    threading.Thread(target=watch, name="camcli-parent-watch", daemon=True).start()


def worker_init(_worker_id: int) -> None:
    """DataLoader worker_init_fn.

    The stop signals reach the whole process group, but only the main process acts on them and then
    stops the workers: a worker stopped on its own would exit while its decoded images still fill
    the pipe (the main process would wait seconds for each), or be reported as a crash. A worker
    dies with its parent, whatever killed the parent (SIGKILL included): orphans would hold memory
    and block on a pipe for good."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    parent = multiprocessing.parent_process()  # its pid as at the fork, even if it has died since
    _die_with_parent(parent.pid if parent is not None and parent.pid is not None else os.getppid())
