"""The trainer's last word: a small process that prints the one `llmjax:` line for a trainer that
died without a chance to print it (JAX's C++ runtime aborted it).

Why a process: when process 0 of a multi-process job dies, it takes jax.distributed's coordination
service with it. Every survivor's client then fails its pending PollForError RPC at once and its
missed-heartbeat callback ends the process with LOG(QFATAL) -> abort(), in C++, within
milliseconds: no Python code of the survivor runs again (a Python callback cannot replace it: the
binding cannot hand absl::Status to Python and terminates with std::bad_cast). So the survivor
cannot speak for itself, and the line comes from here.

guard.trainer starts it with a pipe on its stdin (`python -I -S watchdog.py LOG SIZE CHECKPOINTS K
N`; SIZE: the log's size then, where the lines of this run begin; standard library only, so it
starts in milliseconds and never imports jax). The trainer's
faulthandler writes into the pipe, and the trainer writes DONE into it whenever it ends by itself
(its own line printed, or a normal exit). When the pipe closes:
- DONE seen: the trainer spoke for itself; nothing to add.
- a fatal-signal dump seen (`Fatal Python error: ...`, faulthandler's): the trainer aborted. One
  line on stderr names the cause (a lost coordinator when JAX's distributed service said so in
  LOG) and the latest committed checkpoint in CHECKPOINTS; the dump goes to LOG.
- nothing: the trainer was killed outright (SIGKILL, the OOM killer); whoever killed it knows, and
  a victim of a multi-process test must not add a line to the survivor's.
"""

from __future__ import annotations

import os
import signal
import sys

DONE = b"\0llmjax-done\0"
# What JAX's client logs (xla/pjrt/distributed/client.h) before it aborts a process whose
# distributed service failed, and what its status says when the service itself (process 0) is gone.
JAX_FATAL = "JAX distributed service detected fatal errors"
SERVICE_GONE = ("Failed to send RPC to coordination service", "leader task")


def latest(checkpoints: str) -> str:
    """The latest committed checkpoint (Orbax renames a step's folder to its number on commit)."""
    try:
        steps = sorted(int(p) for p in os.listdir(checkpoints) if p.isdigit())
    except OSError:
        steps = []
    return f"{checkpoints}/{steps[-1]}" if steps else "none yet"


def cause(log_tail: str, dump: str, me: int, n: int) -> str:
    """What ended the trainer, from JAX's lines in the log and the fatal-signal dump."""
    if JAX_FATAL in log_tail:
        if any(s in log_tail for s in SERVICE_GONE) and me != 0:
            return f"process 0 of {n} was lost (the coordinator; JAX ended process {me} at once)"
        return f"JAX's distributed service ended process {me} of {n} (a peer was lost)"
    first = dump.strip().splitlines()[0] if dump.strip() else "a fatal signal"
    return f"process {me} of {n} died: {first}" if n > 1 else f"the trainer died: {first}"


def main(log: str, start: int, checkpoints: str, me: int, n: int) -> None:
    # The terminal's Ctrl-C and a launcher's SIGTERM are for the trainer: this one waits for its
    # end, which closes the pipe.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    received = b""
    while chunk := os.read(0, 65536):
        received += chunk
    if DONE in received or b"Fatal Python error" not in received:
        return
    dump = received.decode("utf-8", "replace")
    tail = ""
    try:
        with open(log, "rb") as f:
            f.seek(start)
            tail = f.read().decode("utf-8", "replace")
        with open(log, "a") as f:
            f.write(dump)
    except OSError:
        pass
    line = f"llmjax: {cause(tail, dump, me, n)}; latest intact checkpoint: {latest(checkpoints)}"
    os.write(2, f"{line} (details in {log})\n".encode())


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
