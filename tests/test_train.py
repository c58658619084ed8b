import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax import checkpoint, data, sharding, train
from tests.conftest import pretrain_run, tiny_config


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_overfits_one_batch(byte_data):
    cfg = tiny_config(byte_data, **{"optim.warmup_steps": 0, "train.steps": 60})
    run = pretrain_run(cfg)
    state = run.init()
    batch = next(
        data.train_batches(
            byte_data, seq_len=32, batch=8, vocab_size=257, seed=0, start_step=0, steps=1
        )
    )
    b = sharding.put_batch(batch, run.mesh)
    first = None
    for _ in range(60):
        state, m = run.train_step(state, b)
        first = first if first is not None else float(m["train/loss"])
    assert abs(first - math.log(257)) < 0.1
    assert float(m["train/loss"]) < 1.0  # memorised


def test_grad_accumulation_matches_full_batch(byte_data):
    batch = next(
        data.train_batches(
            byte_data, seq_len=32, batch=8, vocab_size=257, seed=0, start_step=0, steps=1
        )
    )
    out = {}
    for accum in (1, 4):
        run = pretrain_run(tiny_config(byte_data, **{"optim.grad_accum": accum}))
        state = run.init()
        state, m = run.train_step(state, sharding.put_batch(batch, run.mesh))
        out[accum] = (float(m["train/loss"]), float(m["train/grad_norm"]), state.params)
    np.testing.assert_allclose(out[1][0], out[4][0], rtol=1e-5)
    np.testing.assert_allclose(out[1][1], out[4][1], rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), out[1][2], out[4][2])


def test_non_finite_step_is_skipped(byte_data):
    run = pretrain_run(tiny_config(byte_data))
    state = run.init()
    batch = next(
        data.train_batches(
            byte_data, seq_len=32, batch=8, vocab_size=257, seed=0, start_step=0, steps=1
        )
    )
    poisoned = state.replace(params=jax.tree.map(lambda p: p * jnp.nan, state.params))
    after, m = run.train_step(poisoned, sharding.put_batch(batch, run.mesh))
    assert not math.isfinite(float(m["train/loss"]))
    assert int(after.skipped) == 1 and int(after.bad_streak) == 1 and int(after.step) == 1
    assert int(after.opt_state[1][0].count) == 0  # the optimizer never saw the step


# The speedrun recipe (configs/speedrun_tiny.py's keys) on the tiny model: Muon's optimizer state
# and rotary decoding go through the same checkpoint, resume and sampling paths as GPT-2's.
RECIPE = {
    "model.position": "rope",
    "model.norm": "rmsnorm",
    "model.qk_norm": True,
    "model.mlp": "relu2",
    "model.bias": False,
    "model.tie_embeddings": False,
    "model.zero_init_proj": True,
    "optim.name": "muon",
    "optim.muon_momentum_warmup": 10,
    "optim.schedule": "wsd",
}


@pytest.fixture(scope="module", params=["gpt2", "recipe"])
def recipe(request) -> dict:
    return RECIPE if request.param == "recipe" else {}


@pytest.fixture(scope="module")
def trained(byte_data, recipe, tmp_path_factory):
    """One uninterrupted 20-step tiny run."""
    full = str(tmp_path_factory.mktemp("full"))
    train.train_and_evaluate(tiny_config(byte_data, **recipe), full)
    return full


def test_metrics_jsonl_keys(trained):
    full = trained
    with open(os.path.join(full, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [5, 10, 15, 20]
    for key in ("train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_sec", "perf/mfu"):
        assert key in train_rows[0]
    assert [r["step"] for r in rows if "eval/loss" in r] == [10, 20]
    assert train_rows[-1]["train/loss"] < train_rows[0]["train/loss"] - 0.5
    assert os.listdir(os.path.join(full, "tb"))
    assert sorted(os.listdir(os.path.join(full, "checkpoints")))[:2] == ["10", "20"]


def test_resume_continues_the_same_run(byte_data, recipe, trained, tmp_path):
    # A run that stopped right after its step-10 checkpoint: the finished run minus what came later.
    part = str(tmp_path / "part")
    shutil.copytree(trained, part)
    shutil.rmtree(os.path.join(part, "checkpoints", "20"))
    os.remove(os.path.join(part, "metrics.jsonl"))
    final = train.train_and_evaluate(tiny_config(byte_data, **recipe), part)
    assert int(final.step) == 20
    resumed, ref = _losses(part), _losses(trained)
    assert sorted(resumed) == [15, 20]  # steps 1..10 were not trained again
    assert resumed[15] == ref[15] and resumed[20] == ref[20]  # bit for bit on CPU float32


def test_sampling_from_workdir(trained):
    from llmjax.sample import generate

    model, tok, step = checkpoint.load_model(trained)
    assert step == 20 and tok.name == "bytes"
    out = generate(model, [tok.encode("The ")], 10, temperature=0.0)
    assert len(out[0]) == 10 and all(0 <= t < 257 for t in out[0])


def test_sample_cli_fits_the_context(trained):
    import subprocess
    import sys

    from tests.conftest import ROOT

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmjax.sample",
            f"--workdir={trained}",
            "--prompt=",
            "--max_new_tokens=500",
            "--temperature=0",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert proc.returncode == 0, proc.stderr
    assert "63 new tokens" in proc.stderr  # block_size 64, minus the EOT that starts the prompt
    model, tok, _ = checkpoint.load_model(trained)
    from llmjax.sample import generate

    out = generate(model, [[tok.eot_id]], 63, temperature=0.0, eot_id=tok.eot_id)[0]
    expect = tok.decode(out)
    assert proc.stdout == expect + "\n"
