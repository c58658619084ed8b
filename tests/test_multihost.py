"""Two processes on localhost joined by jax.distributed (CPU collectives: gloo, JAX's default) train
exactly like one process, log once, and write checkpoints that other layouts resume.

The two-process run uses 2 CPU devices each and mesh fsdp=4, so every weight is split across the
two processes: the hardest layout (cross-host ZeRO, gathering weights for samples)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT, free_port

ARGS = [
    "--config=configs/tiny.py",
    "--config.model.n_layer=1",
    "--config.train.steps=6",
    "--config.train.log_every=1",
    "--config.train.ckpt_every=3",
    "--config.train.eval_every=6",
    "--config.train.sample_every=6",
    "--config.train.sample_tokens=8",
]
SPAN_HOSTS = ["--config.mesh.data=1", "--config.mesh.fsdp=4"]


def _env(devices: int | None = None) -> dict:
    # Optimization level 0 halves the compile time; every run here uses the same flags.
    flags = "--xla_backend_optimization_level=0"
    if devices:
        flags += f" --xla_force_host_platform_device_count={devices}"
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags, PYTHON=sys.executable)


def _main(workdir: str, data_path: str, *extra: str, devices: int = 1):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmjax.main",
            *ARGS,
            f"--workdir={workdir}",
            f"--config.data.path={data_path}",
            *extra,
        ],
        cwd=ROOT,
        env=_env(devices),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _launch(n: int, workdir: str, data_path: str, *extra: str):
    env = dict(_env(), PORT=str(free_port()), CPU_DEVICES_PER_PROCESS="2")
    r = subprocess.run(
        [
            "bash",
            "launch/multiprocess_local.sh",
            str(n),
            *ARGS,
            f"--workdir={workdir}",
            f"--config.data.path={data_path}",
            *extra,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def _rows(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _losses(workdir: str, key: str = "train/loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in _rows(workdir) if key in r}


@pytest.fixture(scope="module")
def runs(byte_data, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("multihost")
    one, two = str(tmp / "one"), str(tmp / "two")
    return {
        "one": one,
        "one_out": _main(one, byte_data).stdout,
        "two": two,
        "two_out": _launch(2, two, byte_data, *SPAN_HOSTS).stdout,
    }


def test_two_processes_match_one(runs):
    one, two = _losses(runs["one"]), _losses(runs["two"])
    assert sorted(two) == [1, 2, 3, 4, 5, 6] and one[6] < one[1] - 0.3
    np.testing.assert_allclose([two[s] for s in one], list(one.values()), rtol=1e-5, atol=0)
    np.testing.assert_allclose(
        _losses(runs["two"], "eval/loss")[6], _losses(runs["one"], "eval/loss")[6], rtol=1e-5
    )


def test_two_processes_log_once(runs):
    out = runs["two_out"]
    assert "mesh data=1 x fsdp=4 x tensor=1 over 4 cpu devices in 2 process(es)" in out
    for line in (
        "compiled train step",
        "step      6/6 | loss",
        "step      6/6 | eval loss",
        "step      6/6 | sample: ",
    ):
        assert out.count(line) == 1, line
    assert [r["step"] for r in _rows(runs["two"])] == [1, 2, 3, 4, 5, 6, 6, 6]
    # The sample comes from weights gathered across both processes: the same text as one process.
    sample = [r["sample"] for r in _rows(runs["two"]) if "sample" in r]
    assert sample == [r["sample"] for r in _rows(runs["one"]) if "sample" in r]
    # Every process took part in each save; Orbax commits a step only when all have written.
    assert sorted(os.listdir(os.path.join(runs["two"], "checkpoints"))) == ["3", "6"]


def _truncate(src: str, dst: str) -> str:
    """The run as it stood right after its step-3 checkpoint."""
    shutil.copytree(src, dst)
    shutil.rmtree(os.path.join(dst, "checkpoints", "6"))
    os.remove(os.path.join(dst, "metrics.jsonl"))
    return dst


@pytest.mark.slow
def test_two_process_checkpoint_resumes_in_one_process(runs, byte_data, tmp_path):
    part = _truncate(runs["two"], str(tmp_path / "part"))
    _main(part, byte_data)
    resumed, ref = _losses(part), _losses(runs["one"])
    assert sorted(resumed) == [4, 5, 6]
    np.testing.assert_allclose(
        [resumed[s] for s in (4, 5, 6)], [ref[s] for s in (4, 5, 6)], rtol=1e-5, atol=0
    )


@pytest.mark.slow
def test_eight_device_checkpoint_resumes_on_one_device_and_two_processes(runs, byte_data, tmp_path):
    eight = str(tmp_path / "eight")
    _main(eight, byte_data, "--config.mesh.data=2", "--config.mesh.fsdp=4", devices=8)
    ref = _losses(eight)
    np.testing.assert_allclose(
        list(ref.values()), list(_losses(runs["one"]).values()), rtol=1e-5, atol=0
    )
    _main(_truncate(eight, str(tmp_path / "on_one")), byte_data)
    _launch(2, _truncate(eight, str(tmp_path / "on_two")), byte_data)
    for part in ("on_one", "on_two"):
        resumed = _losses(str(tmp_path / part))
        assert sorted(resumed) == [4, 5, 6], part
        np.testing.assert_allclose(
            [resumed[s] for s in (4, 5, 6)],
            [ref[s] for s in (4, 5, 6)],
            rtol=1e-5,
            atol=0,
            err_msg=part,
        )


@pytest.mark.slow
def test_tensor_axis_across_processes_refused(byte_data, tmp_path):
    # Each process loads half the batch, but tensor=2 over the two processes' devices would need
    # the whole batch on both: refused before anything compiles, on every process.
    env = dict(_env(), PORT=str(free_port()))
    r = subprocess.run(
        [
            "bash",
            "launch/multiprocess_local.sh",
            "2",
            *ARGS,
            f"--workdir={tmp_path}",
            f"--config.data.path={byte_data}",
            "--config.mesh.data=1",
            "--config.mesh.tensor=2",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 2
    assert (
        "llmjax: mesh {'data': 1, 'fsdp': 1, 'tensor': 2} over 2 processes: process 0's "
        "devices hold batch rows 0..7, not the 1/2 it loads"
    ) in r.stderr


@pytest.mark.slow
def test_scaling_benchmark_smoke():
    r = subprocess.run(
        [
            sys.executable,
            "benchmarks/scaling.py",
            "--config=configs/tiny.py",
            "--config.model.n_layer=1",
            "--devices=1,2",
            "--steps=2",
            "--warmup=1",
        ],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    out = json.loads(lines[-1])
    assert "6N + 6*L*C*T" in out["mfu_formula"] and lines[-2] == out["mfu_formula"]
    one, two = out["results"]
    assert (one["devices"], two["devices"]) == (1, 2) and two["mesh"]["data"] == 2
    assert (one["batch"], two["batch"]) == (4, 8)  # weak scaling: 8 / 2 sequences per device
    assert two["tokens_per_sec_per_device"] == pytest.approx(two["tokens_per_sec"] / 2)
    assert one["scaling_efficiency"] == 1.0
    assert two["scaling_efficiency"] == pytest.approx(
        two["tokens_per_sec_per_device"] / one["tokens_per_sec_per_device"]
    )
    # 6N + 6*L*C*T with N = 74,688 (1 layer), L = 1, C = 64, T = 32.
    assert one["n_params"] == 74_688 and one["flops_per_token"] == 6 * 74_688 + 6 * 1 * 64 * 32
