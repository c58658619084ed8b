"""The trainer's guard against faults from outside: one trainer per workdir, library noise kept
out of the terminal, no checkpoint lost to a crash, and a dead peer ends the job.

`trainer(workdir)` wraps a training run (llmjax.main):
- takes the workdir lock first (workdir_lock.py; process 0 for the whole job);
- sends the libraries' output to WORKDIR/errors.log: the stderr file descriptor (C++ logs, XLA,
  TensorStore, gloo, fatal-signal dumps), Python logging records not from llmjax, library
  warnings, and the tracebacks of threads and of objects freed with an error. The terminal keeps
  llmjax's own lines;
- on any error after training started (a checkpoint is open for writing): gives the save in flight
  up to SETTLE_S to commit or removes it (checkpoint.settle), then prints one line, `llmjax:
  <what failed>; latest intact checkpoint: DIR/N ...`, writes the traceback to errors.log and
  exits at once (a process whose peer is gone would otherwise wait at JAX's shutdown barrier);
- with several processes, watches its peers (PeerWatch): a process that stops beating for LOST_S
  ends every survivor with one line naming it, whatever they are blocked in;
- starts the watchdog (watchdog.py), which prints the line for a trainer that JAX's C++ runtime
  aborted before Python could (every survivor of a dead process 0).
"""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import logging as std_logging
import os
import subprocess
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Iterator

import jax
import ml_collections
import numpy as np
from absl import logging

from llmjax import checkpoint, errors, memory, watchdog, workdir_lock
from llmjax.errors import UserError

ERRORS_LOG = "errors.log"
# How long a failed run waits for its save in flight to commit. Tiny and 124M checkpoints commit
# in seconds; beyond this the half-written one is removed and the previous one is the latest.
SETTLE_S = 60.0
# Peer liveness: every process bumps its counter in the distributed key-value store every
# BEAT_S; one whose counter has not moved for LOST_S is lost. LOST_S is well above the longest
# pause of a Python thread in a healthy process (the beat thread needs the GIL; long native calls
# release it) and well below JAX's own heartbeat timeout (sharding.HEARTBEAT_TIMEOUT_S), which
# would abort the process without a word.
BEAT_S, LOST_S = 1.0, 10.0
_PACKAGE = os.path.dirname(os.path.abspath(__file__))


class _Terminal:
    """Where the run's own lines go once fd 2 is the log: a copy of the original stderr."""

    def __init__(self, log_path: str):
        self.log_path = log_path
        self.before = os.stat(log_path) if os.path.exists(log_path) else None
        self.log = open(log_path, "a", buffering=1)  # noqa: SIM115
        self.stream = os.fdopen(os.dup(2), "w", buffering=1)
        self.saved_fd = os.dup(2)
        self.saved = (sys.stderr, threading.excepthook, sys.unraisablehook, warnings.showwarning)
        self.filter = _LibraryRecords(self.log)

    def divert(self) -> None:
        self.log.write(
            f"=== {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())} pid {os.getpid()} "
            f"process {jax.process_index()}: {' '.join(sys.argv)}\n"
        )
        sys.stderr.flush()
        os.dup2(self.log.fileno(), 2)
        sys.stderr = self.stream
        handler = logging.get_absl_handler().python_handler
        self.saved_handler_stream = handler.stream
        handler.stream = self.stream
        logging.get_absl_handler().addFilter(self.filter)
        threading.excepthook = lambda a: self.traceback(a.exc_value, f"in thread {a.thread}")
        sys.unraisablehook = lambda u: self.traceback(u.exc_value, f"unraisable: {u.err_msg}")
        warnings.showwarning = lambda m, c, f, n, file=None, line=None: self.log.write(
            warnings.formatwarning(m, c, f, n, line)
        )

    def restore(self, *, undo: bool = False) -> None:
        """Gives the terminal its stderr back; `undo`: the run was refused before training, so
        errors.log is left exactly as it was (what a refused command must not touch)."""
        sys.stderr.flush()
        os.dup2(self.saved_fd, 2)
        sys.stderr, threading.excepthook, sys.unraisablehook, warnings.showwarning = self.saved
        logging.get_absl_handler().removeFilter(self.filter)
        logging.get_absl_handler().python_handler.stream = self.saved_handler_stream
        self.log.close()
        if undo and self.before is None:
            os.remove(self.log_path)
        elif undo:
            os.truncate(self.log_path, self.before.st_size)
            os.utime(self.log_path, ns=(self.before.st_atime_ns, self.before.st_mtime_ns))

    def traceback(self, e: BaseException | None, where: str = "") -> None:
        try:
            self.log.write(f"--- {where}\n")
            self.log.write("".join(traceback.format_exception(e)) if e else "(no exception)\n")
            self.log.flush()
        except (ValueError, OSError):  # closed or full: the line on the terminal still goes out
            pass

    def line(self, text: str) -> None:
        print(f"llmjax: {text}", file=self.stream, flush=True)
        self.log.write(f"llmjax: {text}\n")


class _LibraryRecords(std_logging.Filter):
    """Python logging records from outside llmjax go to the log, not the terminal."""

    def __init__(self, log):
        super().__init__()
        self.log = log

    def filter(self, record: std_logging.LogRecord) -> bool:
        if record.pathname.startswith(_PACKAGE):
            return True
        with contextlib.suppress(ValueError, OSError):
            self.log.write(
                std_logging.Formatter("%(levelname)s %(name)s: %(message)s\n").format(record)
            )
            if record.exc_info:
                self.log.write("".join(traceback.format_exception(*record.exc_info)))
        return False


def _lock_job(workdir: str) -> workdir_lock.WorkdirLock | None:
    """Process 0 takes the lock; every process learns whether it did, so all refuse together."""
    lock, error = None, None
    if jax.process_index() == 0:
        try:
            lock = workdir_lock.acquire(workdir)
        except UserError as e:
            error = e
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
        if not ok and error is None:
            error = workdir_lock.WorkdirLockError(
                f"process 0 could not lock --workdir={os.path.abspath(workdir)} (its line says why)"
            )
    if error is not None:
        raise error
    return lock


class LastWord:
    """The watchdog process (watchdog.py) on the other end of a pipe that carries this process's
    fatal-signal dump (faulthandler) and, once this process has spoken for itself, DONE.
    `process` of `processes`: this one's index and the job's count, for the line."""

    def __init__(self, log_path: str, checkpoints: str, process: int, processes: int):
        read, write = os.pipe()
        script = os.path.join(_PACKAGE, "watchdog.py")
        # stderr inherited: the terminal's (fd 2 becomes errors.log only after this).
        size = os.path.getsize(log_path) if os.path.exists(log_path) else 0
        args = [log_path, str(size), checkpoints, str(process), str(processes)]
        subprocess.Popen(
            [sys.executable, "-I", "-S", script, *args],
            stdin=read,
            stdout=subprocess.DEVNULL,
        )
        os.close(read)
        self.pipe = os.fdopen(write, "wb", buffering=0)
        faulthandler.enable(self.pipe, all_threads=True)
        atexit.register(self.done)  # an exit through Python (an uncaught error, sys.exit)

    def done(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.pipe.write(watchdog.DONE)

    def close(self) -> None:
        """The run ended by itself: fatal-signal dumps go to stderr again; the watchdog exits."""
        self.done()
        faulthandler.enable()
        self.pipe.close()


class _Exit:
    """The one report of a failed run: the first caller (main thread or PeerWatch) prints and
    exits; any later one waits for the exit."""

    def __init__(self, term: _Terminal, lock: workdir_lock.WorkdirLock | None, last: LastWord):
        self.term, self.lock, self.once, self.last = term, lock, threading.Lock(), last

    def __call__(self, message: str, code: int, e: BaseException | None, settle_s: float) -> None:
        if not self.once.acquire(blocking=False):
            threading.Event().wait()  # the first report is exiting the process
        self.term.traceback(e, "the error that ended the run")
        settled = checkpoint.settle(settle_s)
        if settled is not None:
            path, step = settled
            latest = f"{path}/{step}" if step is not None else "none yet"
            if "last good checkpoint" not in message:
                message += f"; latest intact checkpoint: {latest}"
        # A library's error (or a user error it caused) has a traceback worth reading.
        known = isinstance(e, (UserError, FloatingPointError)) and e.__cause__ is None
        if e is not None and not known:
            message += f" (details in {self.term.log_path})"
        self.term.line(message)
        self.last.done()
        sys.stdout.flush()
        logging.flush()
        if self.lock is not None:  # the next trainer finds no lock left behind to take over
            self.lock.release()
        os._exit(code)


class PeerWatch:
    """Beats for this process and watches the others' beats (see BEAT_S, LOST_S)."""

    def __init__(self, report: _Exit):
        from jax._src import distributed  # the job's key-value store: no public handle in jax

        self.client, self.report = distributed.global_state.client, report
        self.me, self.n = jax.process_index(), jax.process_count()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="llmjax-peers", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        seen = {p: (None, time.monotonic()) for p in range(self.n) if p != self.me}
        while not self.stop.wait(BEAT_S):
            try:
                self.client.key_value_increment(f"llmjax/beat/{self.me}", 1)
                beats = {
                    k.rsplit("/", 1)[-1]: v
                    for k, v in self.client.key_value_dir_get("llmjax/beat/")
                }
                done = {
                    k.rsplit("/", 1)[-1] for k, _ in self.client.key_value_dir_get("llmjax/done/")
                }
            except Exception as e:  # the store lives in process 0
                if not self.stop.is_set():
                    self.report(
                        f"process 0 of {self.n} was lost (the coordinator: it died or its host "
                        "is unreachable)",
                        1,
                        e,
                        3.0,
                    )
                return
            now = time.monotonic()
            for p, (value, since) in seen.items():
                if str(p) in done:
                    continue
                if beats.get(str(p)) != value:
                    seen[p] = (beats.get(str(p)), now)
                elif now - since > LOST_S and not self.stop.is_set():
                    self.report(
                        f"process {p} of {self.n} was lost (no heartbeat for {now - since:.0f} s)",
                        1,
                        None,
                        3.0,  # a save needs every process: it cannot commit any more
                    )

    def finish(self) -> None:
        """This process ended its run: peers stop watching it."""
        self.stop.set()
        with contextlib.suppress(Exception):
            self.client.key_value_set(f"llmjax/done/{self.me}", "1")


def summary(e: BaseException, cfg: ml_collections.ConfigDict | None) -> tuple[str, int]:
    """(line, exit code) for an error that ended a run."""
    if cfg is not None and memory.is_out_of_memory(e):
        return f"out of memory ({errors.one_line(e)[:160]}); {memory.advice(cfg)}", 2
    if isinstance(e, UserError):
        return errors.one_line(e), 2
    if isinstance(e, FloatingPointError):  # diverged: the message names the last good checkpoint
        return errors.one_line(e), 1
    if isinstance(e, KeyboardInterrupt):
        return "interrupted", 130
    return f"{type(e).__name__}: {errors.one_line(e)}", 1


def collective_failed(e: BaseException | None) -> bool:
    """Whether `e` or an error behind it is a failed collective: a JAX runtime error, or Gloo's
    (a checkpoint save's barrier runs on Gloo and surfaces as a save error)."""
    for _ in range(8):  # a chain is short; the bound guards against a cyclic one
        if e is None:
            return False
        if isinstance(e, jax.errors.JaxRuntimeError) or "Gloo" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _hear_the_watch(watch: PeerWatch | None, term: _Terminal, e: BaseException) -> None:
    """A collective failed: most likely a peer died. The watch names it within LOST_S (and ends
    the process); only if every peer still beats is `e` the story."""
    if watch is not None and collective_failed(e):
        term.traceback(e, "a collective failed; waiting for the peer watch")
        watch.stop.wait(LOST_S + 3 * BEAT_S)


@contextlib.contextmanager
def trainer(workdir: str, cfg: ml_collections.ConfigDict | None = None) -> Iterator[None]:
    """The guard around one training run in `workdir` (see the module's docstring); `cfg` names
    the keys to change in the line for a step out of memory."""
    log_path = os.path.join(os.path.abspath(workdir), ERRORS_LOG)
    last = LastWord(
        log_path, checkpoint.directory(workdir), jax.process_index(), jax.process_count()
    )
    lock = _lock_job(workdir)
    term = _Terminal(log_path)
    term.divert()
    report = _Exit(term, lock, last)
    watch = PeerWatch(report) if jax.process_count() > 1 else None
    try:
        yield
    except UserError as e:
        if not checkpoint.writing():  # refused before training started: nothing to settle
            term.restore(undo=True)
            last.close()
            if lock is not None:
                lock.release()
            raise
        _hear_the_watch(watch, term, e)
        report(*summary(e, cfg), e, SETTLE_S)
    except BaseException as e:
        if isinstance(e, SystemExit):
            raise
        _hear_the_watch(watch, term, e)
        report(*summary(e, cfg), e, SETTLE_S)
    if watch is not None:
        watch.finish()
    term.restore()
    last.close()
    if lock is not None:
        lock.release()
