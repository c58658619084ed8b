"""llmjax.report: the plotted series are metrics.jsonl's, the picture has the expected size, and
bad input is one line with exit code 2."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest

from llmjax import report, train
from tests.conftest import ROOT, tiny_config


@pytest.fixture(scope="module")
def two_runs(byte_data, tmp_path_factory) -> list[str]:
    workdirs = []
    for name, lr in (("a", 3e-3), ("b", 1e-3)):
        workdir = str(tmp_path_factory.mktemp("runs") / name)
        cfg = tiny_config(
            byte_data,
            **{
                "train.steps": 6,
                "train.log_every": 2,
                "train.eval_every": 3,
                "train.eval_batches": 1,
                "train.ckpt_every": 6,
                "train.trackers": "none",
                "optim.lr": lr,
            },
        )
        train.train_and_evaluate(cfg, workdir)
        workdirs.append(workdir)
    return workdirs


def _rows(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_plotted_series_are_metrics_jsonl(two_runs):
    for workdir in two_runs:
        run = report.load_run(workdir)
        rows = _rows(workdir)
        assert run.name == os.path.basename(workdir)
        assert run.tokens_per_step == 8 * 32  # configs/tiny.py: batch 8 x seq_len 32
        keys = {k for r in rows for k in r if k != "step" and r[k] is not None}
        assert set(run.series) == keys
        for key, (steps, values) in run.series.items():
            expected = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            assert list(zip(steps, values, strict=True)) == expected, key
        assert run.series["train/loss"][0] == [2, 4, 6]
        assert run.series["eval/loss"][0] == [3, 6]
        assert run.x([2, 6]) == [512, 1536]


def test_png_svg_html_written(two_runs, tmp_path):
    runs = [report.load_run(w) for w in two_runs]
    out = str(tmp_path / "report.png")
    panels = report.draw(runs, out)
    # No MFU on a CPU (unknown peak), no HellaSwag here: four panels, two rows of two.
    assert panels == ["loss", "learning rate", "tokens/s", "gradient norm"]
    with open(out, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", head[16:24]) == (2 * 500, 2 * 320)
    report.draw(runs, str(tmp_path / "r.svg"), logx=True)
    assert "<svg" in open(tmp_path / "r.svg").read(1000)
    report.draw(runs, str(tmp_path / "r.html"))
    page = open(tmp_path / "r.html").read()
    assert '<img src="data:image/png;base64,' in page and "a, b" in page


def test_events_and_steps_without_a_checkpoint(tmp_path):
    rows = [
        {"step": 10, "train/loss": 3.0, "train/skipped_steps": 0},
        {"step": 20, "train/loss": None, "train/skipped_steps": 2},
        {"step": 13, "event/loss_spike": 4.5, "event/loss_mean": 3.1},
        {"step": 30, "train/loss": 2.5, "train/skipped_steps": 2, "sample": "text"},
    ]
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    run = report.load_run(str(tmp_path))
    assert run.tokens_per_step is None  # no checkpoint yet: plotted against steps
    assert run.series["train/loss"] == ([10, 30], [3.0, 2.5])  # null: a non-finite loss
    assert run.spikes == [(13, 4.5)] and run.skipped == [20]
    assert "event/loss_mean" not in run.series
    assert report.draw([run], str(tmp_path / "r.png"))[0] == "loss"


def _report(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llmjax.report", *args],
        cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_bad_input_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    (tmp_path / "nometrics").mkdir()
    out = f"--out={tmp_path}/r.png"
    cases = [
        ([f"--workdir={tmp_path}/missing", out], "no such directory"),
        ([f"--workdir={tmp_path}/nometrics", out], "no metrics.jsonl"),
        ([f"--workdir={tmp_path}/empty", out], "no metrics logged yet"),
        ([f"--workdir={tmp_path}/empty", f"--out={tmp_path}/r.jpg"], "must end in .png"),
        ([out], "--workdir is required"),
    ]
    for args, message in cases:
        proc = _report(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        (line,) = proc.stderr.strip().splitlines()
        assert line.startswith("llmjax: ") and message in line, line
    assert not os.path.exists(tmp_path / "r.png")


def test_cli_overlays_runs(two_runs, tmp_path):
    out = str(tmp_path / "both.png")
    proc = _report(*[f"--workdir={w}" for w in two_runs], f"--out={out}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"report: {out}"
    assert os.path.getsize(out) > 10_000
