"""Pictures of runs: one panel per quantity, several runs overlaid, events marked.

    python -m llmjax.report --workdir=runs/a [--workdir=runs/b ...] --out=report.png [--logx]

Reads each workdir's metrics.jsonl (and its latest checkpoint's config, for tokens per step);
writes .png, .svg, or .html with the picture embedded. `load_run` is what gets plotted, so it
can be checked against metrics.jsonl without looking at pixels.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import math
import os

from absl import flags

from llmjax import errors

# (panel title, keys drawn in it); a panel no run has data for is left out.
PANELS = [
    ("loss", ("train/loss", "eval/loss")),
    ("learning rate", ("train/lr",)),
    ("tokens/s", ("perf/tokens_per_sec",)),
    ("MFU", ("perf/mfu",)),
    ("gradient norm", ("train/grad_norm",)),
    ("HellaSwag", ("eval/hellaswag_acc", "eval/hellaswag_acc_norm")),
]
FORMATS = (".png", ".svg", ".html")
PANEL_PX = (500, 320)  # one panel at 100 dpi; the figure is 2 panels wide


class ReportError(errors.UserError):
    """A workdir with nothing to plot, or an output the report cannot write."""


@dataclasses.dataclass
class Curves:
    """What the report plots for one workdir."""

    name: str
    tokens_per_step: int | None  # None: no checkpoint yet, so the x axis is steps
    series: dict[str, tuple[list[int], list[float]]]  # key -> (steps, values), in file order
    spikes: list[tuple[int, float]]  # (step, loss) of loss-spike events
    skipped: list[int]  # log steps whose interval had skipped (non-finite) steps

    def x(self, steps: list[int]) -> list[float]:
        return [s * (self.tokens_per_step or 1) for s in steps]


def load_run(workdir: str) -> Curves:
    """The series of metrics.jsonl: every finite number at its step (null = non-finite is left
    out), loss-spike events, and the intervals where steps were skipped."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isdir(workdir):
        raise ReportError(f"--workdir={workdir}: no such directory")
    if not os.path.isfile(path):
        raise ReportError(f"--workdir={workdir}: no metrics.jsonl (not a training run?)")
    series: dict[str, tuple[list[int], list[float]]] = {}
    spikes, skipped, last_skipped = [], [], 0
    with open(path) as f:
        for n, line in enumerate(f, 1):
            try:
                row = json.loads(line)
                step = int(row["step"])
            except (ValueError, KeyError, TypeError) as e:
                raise ReportError(f"{path}:{n}: not a metrics row ({errors.one_line(e)})") from e
            if "event/loss_spike" in row:
                spikes.append((step, row["event/loss_spike"]))
                continue
            if row.get("train/skipped_steps", 0) > last_skipped:
                skipped.append(step)
                last_skipped = row["train/skipped_steps"]
            for k, v in row.items():
                if k != "step" and isinstance(v, int | float) and math.isfinite(v):
                    steps, values = series.setdefault(k, ([], []))
                    steps.append(step)
                    values.append(float(v))
    if not series:
        raise ReportError(f"{path}: no metrics logged yet")
    return Curves(
        name=os.path.basename(os.path.normpath(workdir)),
        tokens_per_step=_tokens_per_step(workdir),
        series=series,
        spikes=spikes,
        skipped=skipped,
    )


def _tokens_per_step(workdir: str) -> int | None:
    from llmjax import checkpoint  # jax and Orbax: only for a workdir that has metrics

    if not checkpoint.steps_on_disk(checkpoint.directory(workdir)):
        return None
    # As the trainer counts them: a DPO pair is two sequences.
    return checkpoint.latest_record(workdir)[1].tokens_per_step


def draw(runs: list[Curves], out: str, logx: bool = False) -> list[str]:
    """Writes the figure to `out` (.png, .svg, .html); returns the titles of the panels drawn."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    ext = os.path.splitext(out)[1].lower()
    if ext not in FORMATS:
        raise ReportError(f"--out={out}: the name must end in {', '.join(FORMATS)}")
    panels = [(t, keys) for t, keys in PANELS if any(k in r.series for r in runs for k in keys)]
    cols = 2
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(cols * PANEL_PX[0] / 100, rows * PANEL_PX[1] / 100), dpi=100
    )
    tokens = all(r.tokens_per_step for r in runs)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, keys) in zip(axes.flat, panels, strict=False):
        for i, run in enumerate(runs):
            color = colors[i % len(colors)]
            for j, key in enumerate(keys):
                if key in run.series:
                    steps, values = run.series[key]
                    style = "-" if j == 0 else "--o" if key == "eval/loss" else "--"
                    ax.plot(
                        run.x(steps), values, style, color=color, ms=3, label=f"{run.name} {key}"
                    )
            if title == "loss":
                if run.spikes:
                    s, v = zip(*run.spikes, strict=True)
                    ax.plot(run.x(list(s)), v, "x", color=color, label=f"{run.name} loss spike")
                for k, s in enumerate(run.skipped):
                    label = f"{run.name} skipped steps" if k == 0 else None
                    ax.axvline(run.x([s])[0], color=color, ls=":", lw=1, label=label)
        ax.set_title(title)
        ax.set_xlabel("tokens seen" if tokens else "step")
        if logx:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="svg" if ext == ".svg" else "png")
    plt.close(fig)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "wb") as f:
        if ext == ".html":
            names = html.escape(", ".join(r.name for r in runs))
            img = base64.b64encode(buf.getvalue()).decode()
            f.write(
                f"<!doctype html><title>llmjax: {names}</title><h1>{names}</h1>"
                f'<img src="data:image/png;base64,{img}">\n'.encode()
            )
        else:
            f.write(buf.getvalue())
    return [t for t, _ in panels]


FLAGS = flags.FLAGS
flags.DEFINE_multi_string("workdir", [], "a training run's directory (repeat to overlay runs)")
flags.DEFINE_string("out", "report.png", "the picture: .png, .svg, or .html (image embedded)")
flags.DEFINE_bool("logx", False, "tokens on a log scale")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise ReportError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.workdir:
        raise ReportError("--workdir is required (repeat it to overlay runs)")
    if os.path.splitext(FLAGS.out)[1].lower() not in FORMATS:
        raise ReportError(f"--out={FLAGS.out}: the name must end in {', '.join(FORMATS)}")
    runs = [load_run(w) for w in FLAGS.workdir]
    draw(runs, FLAGS.out, FLAGS.logx)
    print(f"report: {FLAGS.out}")


if __name__ == "__main__":
    errors.run(main)
