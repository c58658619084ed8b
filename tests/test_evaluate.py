"""Validation loss and HellaSwag scoring, checked against direct computations."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llmjax import checkpoint, data, evaluate, train
from llmjax.model import GPT, GPTConfig
from llmjax.tokenizer import get_tokenizer
from tests.conftest import ROOT, run_json, tiny_config

FIXTURE = os.path.join(ROOT, "tests", "fixtures", "hellaswag_val_mini.jsonl")
BYTES_CFG = GPTConfig(
    vocab_size=320, valid_vocab_size=257, n_layer=2, n_head=4, n_embd=64, block_size=256
)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_val_loss_is_mean_of_eval_steps_over_whole_split(byte_data):
    model = GPT(BYTES_CFG, nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    out = evaluate.val_loss(graphdef, params, byte_data, seq_len=32, batch=64, vocab_size=257)
    val_tokens = sum(len(data.read_shard(p)) for p in data.split_paths(byte_data, "val"))
    windows = sum(
        (len(data.read_shard(p)) - 33) // 32 + 1 for p in data.split_paths(byte_data, "val")
    )
    assert out["val_batches"] == windows // 64 and out["val_tokens"] <= val_tokens
    step = jax.jit(lambda p, b: evaluate.eval_step(p, b, graphdef=graphdef))
    batches = list(
        data.val_batches(
            byte_data, seq_len=32, batch=64, vocab_size=257, num_batches=out["val_batches"]
        )
    )
    sums = [step(params, jnp.asarray(b)) for b in batches]
    assert all(int(n) == 64 * 32 for _, n in sums)  # every target of a val batch is scored
    losses = [float(s) / float(n) for s, n in sums]
    assert out["val_loss"] == pytest.approx(np.mean(losses), rel=1e-6)
    assert out["val_perplexity"] == pytest.approx(math.exp(out["val_loss"]), rel=1e-6)
    # One batch by hand: mean next-token cross-entropy from the model's logits.
    b = batches[0]
    logp = _log_softmax(np.asarray(jax.jit(model.__call__)(jnp.asarray(b[:, :-1]))))
    by_hand = -np.take_along_axis(logp, b[:, 1:, None], -1).mean()
    assert losses[0] == pytest.approx(by_hand, rel=1e-5)
    short = evaluate.val_loss(
        graphdef, params, byte_data, seq_len=32, batch=64, vocab_size=257, max_batches=2
    )
    assert short["val_batches"] == 2 and short["val_loss"] == pytest.approx(np.mean(losses[:2]))


@pytest.mark.parametrize("block_size", [256, 48])  # 48: contexts are cut from the left
def test_hellaswag_scoring_matches_direct_computation(block_size):
    import dataclasses

    model = GPT(dataclasses.replace(BYTES_CFG, block_size=block_size), nnx.Rngs(1))
    graphdef, params = nnx.split(model)
    tok = get_tokenizer("bytes")
    items = evaluate.load_hellaswag(FIXTURE)
    assert len(items) == 6
    sums, counts = evaluate.score_hellaswag(graphdef, params, items, tok, block_size)
    # Directly: every (context + ending) row right-padded to one length (causal attention makes
    # the padding invisible) in one forward pass, log-softmax in float64, ending positions summed.
    rows = [
        (list(it["ctx"].encode()) + list((" " + e).encode()))[-(block_size + 1) :]
        for it in items
        for e in it["endings"]
    ]
    ends = [len((" " + e).encode()) for it in items for e in it["endings"]]
    padded = np.zeros((len(rows), block_size), np.int32)
    for r, row in enumerate(rows):
        padded[r, : len(row) - 1] = row[:-1]
    logp = _log_softmax(np.asarray(jax.jit(model.__call__)(jnp.asarray(padded))))
    direct_sum, direct_mean = np.zeros(len(rows)), np.zeros(len(rows))
    for r, (row, n_end) in enumerate(zip(rows, ends, strict=True)):
        lp = logp[r, np.arange(len(row) - 1), row[1:]][-n_end:]  # ending tokens still predicted
        direct_sum[r], direct_mean[r] = lp.sum(), lp.mean()
    direct_sum, direct_mean = direct_sum.reshape(6, 4), direct_mean.reshape(6, 4)
    if block_size == 48:
        assert (counts < np.reshape(ends, (6, 4))).any()  # the truncation path was exercised
    np.testing.assert_allclose(sums, direct_sum, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(sums / counts, direct_mean, rtol=1e-5, atol=1e-5)
    labels = np.array([it["label"] for it in items])
    out = evaluate.hellaswag(graphdef, params, items, tok, block_size)
    assert out == {
        "hellaswag_acc": np.mean(direct_sum.argmax(1) == labels),
        "hellaswag_acc_norm": np.mean(direct_mean.argmax(1) == labels),
        "hellaswag_items": 6,
    }


def test_hellaswag_download_and_bad_files(tmp_path):
    url = "file://" + FIXTURE  # the same urllib code path as the official https URL
    path = evaluate.hellaswag_path("download", cache_dir=str(tmp_path / "cache"), url=url)
    assert path == str(tmp_path / "cache" / "hellaswag_val.jsonl")
    assert len(evaluate.load_hellaswag(path)) == 6 and len(evaluate.load_hellaswag(path, 2)) == 2
    assert (
        evaluate.hellaswag_path(
            "download", cache_dir=str(tmp_path / "cache"), url="file:///nonexistent"
        )
        == path
    )  # cached: no refetch
    with pytest.raises(evaluate.EvalError, match="cannot download file:///nonexistent"):
        evaluate.hellaswag_path(
            "download", cache_dir=str(tmp_path / "other"), url="file:///nonexistent"
        )
    assert not os.listdir(tmp_path / "other")  # no partial file left behind
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        open(FIXTURE).readline() + json.dumps({"ctx": "x", "endings": ["a"], "label": 0}) + "\n"
    )
    with pytest.raises(evaluate.EvalError, match="bad.jsonl:2: a HellaSwag item needs"):
        evaluate.load_hellaswag(str(bad))
    with pytest.raises(evaluate.EvalError, match="no such file"):
        evaluate.load_hellaswag(str(tmp_path / "missing.jsonl"))


def test_training_logs_hellaswag_and_cli_agrees(tmp_path, byte_data):
    cfg = tiny_config(
        byte_data,
        **{
            "train.steps": 2,
            "train.log_every": 1,
            "train.eval_every": 2,
            "train.eval_batches": 1,
            "train.ckpt_every": 2,
            "train.hellaswag_every": 2,
            "train.hellaswag_path": FIXTURE,
        },
    )
    work = str(tmp_path / "run")
    train.train_and_evaluate(cfg, work)
    with open(os.path.join(work, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    logged = [r for r in rows if "eval/hellaswag_acc" in r]
    assert len(logged) == 1 and logged[0]["step"] == 2
    assert [r["step"] for r in rows if "eval/loss" in r] == [2]

    out = run_json(
        [
            "-m",
            "llmjax.evaluate",
            f"--workdir={work}",
            f"--data={byte_data}",
            f"--hellaswag={FIXTURE}",
            "--max_batches=3",
        ],
        dict(os.environ, JAX_PLATFORMS="cpu"),
        timeout=300,
    )
    model, _, _ = checkpoint.load_model(work)
    graphdef, params = nnx.split(model)
    assert out["step"] == 2 and out["hellaswag_items"] == 6
    assert out["hellaswag_acc"] == logged[0]["eval/hellaswag_acc"]
    assert out["hellaswag_acc_norm"] == logged[0]["eval/hellaswag_acc_norm"]
    vl = evaluate.val_loss(
        graphdef, params, byte_data, seq_len=32, batch=8, vocab_size=257, max_batches=3
    )
    assert out["val_batches"] == 3 and out["val_loss"] == pytest.approx(vl["val_loss"], rel=1e-6)
