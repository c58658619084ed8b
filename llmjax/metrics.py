"""Where numbers go: WORKDIR/metrics.jsonl, the trackers (TensorBoard under WORKDIR/tb, MLflow,
W&B: trackers.py), the console.

Only process 0 writes.
`RunLog` is the training loop's side of it: what is logged at each interval, loss-spike events,
throughput and MFU, and the state a checkpoint keeps so a resumed run logs exactly as an
uninterrupted one would.
"""

from __future__ import annotations

import collections
import json
import math
import os
import sys
import time

import jax
import numpy as np

from llmjax import trackers as trackers_lib
from llmjax.errors import one_line
from llmjax.progress import Progress, bar, hms

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
    """Makes each row once: appends it to metrics.jsonl, the record, and forwards it to the
    trackers (default: TensorBoard). A tracker that fails is reported once and keeps its unsent
    rows; they are offered again at the next log interval, so training never waits on it."""

    def __init__(
        self,
        workdir: str,
        enabled: bool = True,
        trackers: list[trackers_lib.Tracker] | None = None,
    ):
        self.enabled = enabled
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115
        self.trackers = [trackers_lib.TensorBoard(workdir)] if trackers is None else trackers
        # A bounded backlog: a tracker down for very long loses its oldest rows, never memory.
        self.unsent = {t.name: collections.deque(maxlen=BACKLOG) for t in self.trackers}
        self.failed_at: dict[str, int] = {}  # tracker -> step of its last failure
        self.step = 0  # the latest step forwarded

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _json_number(v) for k, v in values.items()}}
        self._append(row)
        self._forward(
            step, "scalars", step, {k: float(v) for k, v in values.items() if v is not None}
        )

    def text(self, step: int, tag: str, text: str) -> None:
        if not self.enabled:
            return
        self._append({"step": step, tag: text})
        self._forward(step, "text", step, tag, text)

    def _append(self, row: dict) -> None:
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()

    def _forward(self, step: int, method: str, *args) -> None:
        self.step = max(self.step, step)
        for t in self.trackers:
            self.unsent[t.name].append((method, args))
            if step > self.failed_at.get(t.name, -1):  # a failed tracker: once per interval
                self._send(t, step)

    def _send(self, t: trackers_lib.Tracker, step: int) -> bool:
        queue = self.unsent[t.name]
        try:
            while queue:
                method, args = queue[0]
                getattr(t, method)(*args)
                queue.popleft()
        except Exception as e:  # a tracker never stops training
            if t.name not in self.failed_at:
                trackers_lib.warn(
                    f"tracker {t.name} failed at step {step} ({one_line(e)}); training goes on, "
                    "metrics.jsonl keeps every row, and the tracker is retried at each log interval"
                )
            self.failed_at[t.name] = step
            return False
        if self.failed_at.pop(t.name, None) is not None:
            console(f"tracker {t.name} works again at step {step}; the rows it missed were sent")
        return True

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
        self._forward(step, "rewind", step)

    def close(self, finished: bool = True) -> None:
        """`finished`: the run reached its last step (else it stopped, to be resumed)."""
        if not self.enabled:
            return
        self.jsonl.close()
        for t in self.trackers:
            # A last try for a failing tracker's backlog.
            if not self._send(t, self.step) and self.unsent[t.name]:
                trackers_lib.warn(
                    f"tracker {t.name}: {len(self.unsent[t.name])} rows were never sent "
                    "(metrics.jsonl has them)"
                )
            try:
                t.close(finished)
            except Exception as e:  # the run is over; its record is metrics.jsonl
                trackers_lib.warn(f"tracker {t.name} failed to close ({one_line(e)})")


BACKLOG = 100_000  # calls kept per failing tracker


def _json_number(v):
    # JSON has no NaN/inf; a non-finite loss is written as null, never as invalid JSON.
    return None if v is None or not math.isfinite(v) else float(v)


def console(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


SPIKE_DECAY = 0.98  # running mean of the loss for spike events: about the last 50 steps


def loss_spikes(losses: list[float], mean: float, count: int, factor: float):
    """Steps (indices into `losses`) whose loss exceeds `factor` x the running mean of the finite
    losses before it, as (index, loss, mean); and the updated (mean, count)."""
    spikes = []
    for i, loss in enumerate(losses):
        if not np.isfinite(loss):
            continue  # a skipped step: counted elsewhere, never averaged in
        if factor and count and loss > factor * mean:
            spikes.append((i, loss, mean))
        mean = loss if count == 0 else SPIKE_DECAY * mean + (1 - SPIKE_DECAY) * loss
        count += 1
    return spikes, mean, count


class RunLog:
    """The training loop's logging: per-step metrics stay on the device until the interval's one
    host sync (`interval`), which writes their means, throughput, MFU and loss-spike events.

    `replay` is what `replay_state()` saved with the checkpoint the run resumes from (None for a
    fresh run): what the interrupted run logged after that checkpoint is cut off, and the
    per-step metrics it had not logged yet come back, so every later row is bit for bit the same
    as an uninterrupted run's.
    """

    def __init__(
        self,
        workdir: str,
        *,
        steps: int,
        start: int,
        tokens_per_step: int,
        flops_per_step: float,
        spike_factor: float,
        replay: dict | None,
        enabled: bool,
        trackers: list[trackers_lib.Tracker] | None = None,
    ):
        self.writer = Writer(workdir, enabled=enabled, trackers=trackers)
        if replay is not None:  # absent in checkpoints of older versions: logs are left alone
            self.writer.truncate(replay["log_bytes"], start)
        replay = replay or {"pending": [], "loss_mean": [0.0, 0]}
        self.pending: list[dict] = [
            {k: np.float32(v) for k, v in m.items()} for m in replay["pending"]
        ]
        self.loss_mean, self.loss_count = replay["loss_mean"]
        self.steps, self.tokens_per_step, self.flops_per_step = (
            steps,
            tokens_per_step,
            flops_per_step,
        )
        self.spike_factor = spike_factor
        self.peak = peak_flops(jax.devices()[0])
        self.progress = Progress(
            sys.stdout, log_every=None, start_fraction=start / steps, enabled=enabled
        )
        self.t_log, self.step_log = time.time(), start
        self.last: dict = {}

    def record(self, m: dict) -> None:
        """One step's metrics, still on the device."""
        self.pending.append(m)

    def interval(self, done: int, skipped: jax.Array, bad_streak: jax.Array) -> int:
        """The loop's only host sync: fetches the interval's metrics and logs their means.
        Returns the number of consecutive non-finite (skipped) steps up to `done`."""
        fetched = jax.device_get(self.pending)
        self.pending = []
        elapsed = time.time() - self.t_log
        n = done - self.step_log
        tps = self.tokens_per_step * n / elapsed
        row = {k: float(np.mean([f[k] for f in fetched])) for k in fetched[0]}
        row["train/lr"] = float(fetched[-1]["train/lr"])
        skipped, streak = (int(x) for x in jax.device_get((skipped, bad_streak)))
        row["train/skipped_steps"] = skipped
        row["perf/tokens_per_sec"] = tps
        mfu = (
            self.flops_per_step * n / elapsed / self.peak / jax.device_count()
            if self.peak
            else None
        )
        row["perf/mfu"] = mfu
        self.last = {**row, **{k: float(v) for k, v in fetched[-1].items()}}
        self.writer.scalars(done, row)
        eta = (self.steps - done) * elapsed / n
        self.line(
            f"step {done:>6}/{self.steps} | loss {row['train/loss']:.4f} | "
            f"lr {row['train/lr']:.2e} | gnorm {row['train/grad_norm']:.3f} | "
            f"{tps / 1e3:,.1f}k tok/s{f' | mfu {100 * mfu:.1f}%' if mfu else ''} | eta {hms(eta)}"
        )
        losses = [float(f["train/loss"]) for f in fetched]
        spikes, self.loss_mean, self.loss_count = loss_spikes(
            losses, self.loss_mean, self.loss_count, self.spike_factor
        )
        for i, loss, mean in spikes:
            at = done - len(fetched) + 1 + i
            self.writer.scalars(at, {"event/loss_spike": loss, "event/loss_mean": mean})
            self.line(
                f"step {at:>6}/{self.steps} | loss spike: {loss:.4f} is above "
                f"{self.spike_factor} x the running mean {mean:.4f}"
            )
        self.t_log, self.step_log = time.time(), done
        return streak

    def line(self, msg: str) -> None:
        """A console line that does not collide with the progress bar."""
        self.progress.clear()
        console(msg)

    def restart_clock(self, done: int, state) -> None:
        """Evaluation, sampling and checkpointing happen right after a log; keeps them out of
        the next interval's tokens/s."""
        if done == self.step_log and done != self.steps:
            jax.block_until_ready(state)
            self.t_log = time.time()
        f = done / self.steps
        self.progress.update(f"{bar(f)} {done}/{self.steps}", f)

    def replay_state(self) -> dict:
        """What a checkpoint at this step keeps for `replay` (syncs the pending metrics)."""
        self.pending = jax.device_get(self.pending)
        return {
            "pending": [{k: float(v) for k, v in m.items()} for m in self.pending],
            "loss_mean": [self.loss_mean, self.loss_count],
            "log_bytes": self.writer.log_bytes(),
        }

    def close(self) -> None:
        self.writer.close(finished=self.step_log == self.steps)
