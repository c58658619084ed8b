"""Where numbers go: WORKDIR/metrics.jsonl, TensorBoard event files under WORKDIR/tb, the console.

Only process 0 writes. TensorBoard's own event writer is used, so no TensorFlow is needed.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import jax
from tensorboard.compat.proto.event_pb2 import Event, SessionLog
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.text.summary_v2 import text_pb
from tensorboard.summary.writer.event_file_writer import EventFileWriter

# Dense bf16 peak FLOP/s (no sparsity) by jax device_kind, for MFU. Unknown devices report no MFU.
PEAK_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA GeForce RTX 4090": 165e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5p": 459e12,
}


def peak_flops(device: jax.Device) -> float | None:
    kind = device.device_kind
    return PEAK_FLOPS.get(kind) or next(
        (v for k, v in PEAK_FLOPS.items() if kind.startswith(k)), None
    )


class Writer:
    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115
        self.tb = EventFileWriter(os.path.join(workdir, "tb"))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _json_number(v) for k, v in values.items()}}
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        summary = Summary(
            value=[
                Summary.Value(tag=k, simple_value=float(v))
                for k, v in values.items()
                if v is not None
            ]
        )
        self.tb.add_event(Event(wall_time=time.time(), step=step, summary=summary))
        self.tb.flush()

    def text(self, step: int, tag: str, text: str) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, tag: text}) + "\n")
        self.jsonl.flush()
        self.tb.add_event(Event(wall_time=time.time(), step=step, summary=text_pb(tag, text)))
        self.tb.flush()

    def log_bytes(self) -> int:
        """Length of metrics.jsonl so far: saved with each checkpoint for `truncate`."""
        if not self.enabled:
            return 0
        self.jsonl.flush()
        return os.path.getsize(self.jsonl.name)

    def truncate(self, log_bytes: int, step: int) -> None:
        """Forgets what a run logged after its checkpoint at `step` (metrics.jsonl beyond
        `log_bytes`), since the resumed run logs those steps again: the logs read as one run."""
        if not self.enabled:
            return
        if log_bytes < self.log_bytes():
            self.jsonl.truncate(log_bytes)
        # TensorBoard drops events at or after a START event's step when it meets one.
        self.tb.add_event(
            Event(
                wall_time=time.time(),
                step=step + 1,
                session_log=SessionLog(status=SessionLog.START),
            )
        )
        self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()


def _json_number(v):
    # JSON has no NaN/inf; a non-finite loss is written as null, never as invalid JSON.
    return None if v is None or not math.isfinite(v) else float(v)


def console(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


class Progress:
    """A one-line progress bar with ETA, redrawn in place on a terminal, appended elsewhere."""

    def __init__(self, total: int, start: int):
        self.total, self.start, self.t0 = total, start, time.time()
        self.tty = sys.stdout.isatty() and jax.process_index() == 0

    def update(self, step: int, extra: str = "") -> None:
        if not self.tty:
            return
        done = step - self.start
        rate = done / max(time.time() - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        frac = step / self.total
        bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
        sys.stdout.write(f"\r[{bar}] {step}/{self.total} {extra} eta {_hms(eta)} ")
        sys.stdout.flush()

    def clear(self) -> None:
        if self.tty:
            sys.stdout.write("\r\033[K")


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
