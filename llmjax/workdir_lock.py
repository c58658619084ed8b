"""One trainer per workdir: an exclusive lock on WORKDIR/.lock, taken before the workdir is read.

Two trainers on one workdir (a double submit, a requeued job while the old one still runs) delete
each other's checkpoints in progress and interleave metrics.jsonl for good, so the second one
refuses to start. The lock file holds a record of its holder (host, pid, since when, last
heartbeat), which a thread rewrites every HEARTBEAT_S seconds while the lock is held.

What it guarantees, and where:
- The lock itself is `flock` on the file. On a local filesystem the kernel releases it when the
  holder dies, however it dies (kill -9 included), so a lock is never left behind; a record left
  by a dead holder is taken over with one warning.
- On NFS (v3 with lockd, v4) Linux maps `flock` onto the server's byte-range locks, so the lock
  holds across hosts too. Some shared filesystems keep locks local to one client (Lustre mounted
  without `flock`, some FUSE and SMB mounts): there the heartbeat is what is left. A record
  written by another host whose heartbeat is younger than STALE_S refuses the run even when
  `flock` succeeded; an older one is taken over with a warning. Two hosts can then overlap only
  if a holder stays silent for STALE_S (a frozen VM) and wakes up again.
With several processes one lock covers the job: process 0 takes it, and every process learns
the outcome (all refuse together, or none does).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import threading
import time

from absl import logging

from llmjax.errors import UserError

LOCK_FILE = ".lock"
HEARTBEAT_S = 10.0  # how often the holder rewrites its record
STALE_S = 120.0  # a record whose heartbeat is older than this is a dead holder's
_RECORD_BYTES = 512  # the record is rewritten in place, padded to one small write


class WorkdirLockError(UserError):
    """The workdir is held by another trainer, or cannot be locked; the message names which."""


def _describe(rec: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(rec.get("since", 0)))
    return f"host {rec.get('host')} pid {rec.get('pid')} since {since}"


def _read(fd: int) -> dict:
    # A heartbeat may be mid-write; a record that does not parse is read again.
    for _ in range(5):
        raw = os.pread(fd, _RECORD_BYTES, 0).rstrip(b"\0 \n")
        if not raw:
            return {}
        try:
            return json.loads(raw)
        except ValueError:
            time.sleep(0.05)
    return {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class WorkdirLock:
    """The held lock: `release()` (or process exit) frees it."""

    def __init__(self, path: str, fd: int, record: dict):
        """Holds `fd`, already locked and emptied: writes the holder record, starts its beat."""
        self.path, self.fd, self.record = path, fd, record
        self._write()
        self._stop = threading.Event()
        self._fd_lock = threading.Lock()  # no heartbeat into a closed (and reused) descriptor
        self._beat = threading.Thread(target=self._heartbeat, name="llmjax-lock", daemon=True)
        self._beat.start()

    def _write(self) -> None:
        self.record["beat"] = time.time()
        raw = json.dumps(self.record).encode()
        os.pwrite(self.fd, raw.ljust(_RECORD_BYTES, b" "), 0)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with self._fd_lock:
                if self.fd < 0:
                    return
                try:
                    self._write()
                except OSError:  # a full or vanished disk: the run itself will say so
                    pass

    def release(self) -> None:
        """Removes the lock file, then unlocks: a waiting trainer finds no file or a fresh one."""
        self._stop.set()
        with self._fd_lock:
            if self.fd < 0:
                return
            try:
                os.unlink(self.path)
            except OSError:
                pass
            os.close(self.fd)
            self.fd = -1


def acquire(workdir: str) -> WorkdirLock:
    """Takes WORKDIR/.lock (creating the workdir) or raises WorkdirLockError naming the holder."""
    workdir = os.path.abspath(workdir)
    path = os.path.join(workdir, LOCK_FILE)
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise WorkdirLockError(f"--workdir={workdir!r} is not writable ({e.strerror or e})") from e
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise WorkdirLockError(
                f"--workdir={workdir!r} is not writable ({e.strerror or e})"
            ) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            held = _read(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                raise WorkdirLockError(
                    f"--workdir={workdir} is in use by another trainer ({_describe(held)}); "
                    "wait for it to end, or stop it, or use another --workdir"
                ) from None
            raise WorkdirLockError(f"{path}: cannot lock ({e.strerror or e})") from e
        # The holder before us may have removed the file between our open and our flock: then
        # we locked an orphan, and the lock that counts is on whatever the path names now.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    old = _read(fd)
    host, now = socket.gethostname(), time.time()
    if old and old.get("pid") is not None:
        age = now - float(old.get("beat", old.get("since", 0)))
        here = old.get("host") == host
        if (here and old["pid"] != os.getpid() and _pid_alive(old["pid"]) and age < STALE_S) or (
            not here and age < STALE_S
        ):
            # The kernel gave us the lock, but the holder is alive: locks do not reach here.
            os.close(fd)
            raise WorkdirLockError(
                f"--workdir={workdir} is in use by another trainer ({_describe(old)}, heartbeat "
                f"{age:.0f} s ago; this filesystem's locks do not reach it); wait "
                f"{STALE_S:.0f} s after it ends, or use another --workdir"
            )
        logging.warning(
            "took over the lock of %s: %s (%s)",
            workdir,
            _describe(old),
            "no longer running" if here else f"no heartbeat for {age:.0f} s",
        )
    os.ftruncate(fd, 0)
    return WorkdirLock(path, fd, {"host": host, "pid": os.getpid(), "since": now})
