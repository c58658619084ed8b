"""Preference finetuning (DPO): the loss and its gradient by hand, the reference at step 0, a tiny
model learning to prefer the chosen answers, exact resume, and bad input as one line."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llmjax import checkpoint, dpo, train
from llmjax.model import GPT, GPTConfig
from llmjax.tokenizer import get_tokenizer
from tests.conftest import INSTRUCTIONS, ROOT, run_json, snapshot, tiny_config

PREFS = os.path.join(ROOT, "data", "instruction-data-with-preference.json")
SEQ = 128
TINY = {
    "data.tokenizer": "bytes-chat",
    "data.seq_len": SEQ,
    "model.block_size": SEQ,
    "optim.warmup_steps": 2,
}


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_pair_loss_and_gradient_match_numpy(smoothing):
    beta = 0.5
    lp = np.array([[-10.0, -12.5], [-7.25, -6.0]], np.float32)
    ref = np.array([[-11.0, -11.0], [-7.0, -6.5]], np.float32)
    valid = np.array([True, True])
    (loss, (n, sums)), grad = jax.value_and_grad(
        lambda lp: dpo.pair_loss(lp, jnp.asarray(ref), valid, beta=beta, label_smoothing=smoothing),
        has_aux=True,
    )(jnp.asarray(lp))
    r = beta * (lp.astype(np.float64) - ref)
    m = r[:, 0] - r[:, 1]  # 1.25, -0.375
    by_hand = -(1 - smoothing) * np.log(_sigmoid(m)) - smoothing * np.log(_sigmoid(-m))
    np.testing.assert_allclose(float(loss), by_hand.sum(), rtol=1e-6)
    assert float(n) == 2
    np.testing.assert_allclose(float(sums["margin"]), m.sum(), rtol=1e-6)
    np.testing.assert_allclose(float(sums["chosen_reward"]), r[:, 0].sum(), rtol=1e-6)
    np.testing.assert_allclose(float(sums["rejected_reward"]), r[:, 1].sum(), rtol=1e-6)
    assert float(sums["reward_acc"]) == 1.0  # one pair right, one wrong
    # d loss / d margin by hand; the margin moves with +beta lp_chosen and -beta lp_rejected.
    dm = -(1 - smoothing) * _sigmoid(-m) + smoothing * _sigmoid(m)
    np.testing.assert_allclose(np.asarray(grad), np.stack([beta * dm, -beta * dm], 1), rtol=1e-6)
    # Ties count one half; invalid pairs (padding) count as nothing.
    _, (n, sums) = dpo.pair_loss(jnp.asarray(ref), jnp.asarray(ref), np.array([1, 0]), beta=beta)
    assert float(n) == 1 and float(sums["reward_acc"]) == 0.5 and float(sums["margin"]) == 0


def _naive_logps(model, tokens_P2T1):
    """Summed log-probabilities of the scored targets from the full logits (float32)."""
    b = tokens_P2T1.reshape(-1, tokens_P2T1.shape[-1])
    ids = jnp.where(b < 0, -1 - b, b)
    logp = jax.nn.log_softmax(model(ids[:, :-1]).astype(jnp.float32), axis=-1)
    tgt = jnp.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
    return (tgt * (b[:, 1:] >= 0)).sum(1).reshape(tokens_P2T1.shape[:2])


def _two_pairs(tok) -> np.ndarray:
    q = [{"role": "user", "content": "Name a color."}]
    rows = [
        [q + [{"role": "assistant", "content": a}] for a in ("Blue.", "Ugh, fine: blue, I guess.")],
        [q + [{"role": "assistant", "content": a}] for a in ("Red is one.", "Red.")],
    ]
    from llmjax.instruct import encode_row

    return np.stack([np.stack([encode_row(tok, m, 48)[0] for m in pair]) for pair in rows])


def test_chunked_logps_and_dpo_gradient_match_a_direct_computation():
    cfg = GPTConfig(
        vocab_size=320, valid_vocab_size=261, n_layer=1, n_head=2, n_embd=32, block_size=64
    )
    graphdef, params = nnx.split(GPT(cfg, nnx.Rngs(0)))
    params = nnx.to_pure_dict(params)
    tokens = jnp.asarray(_two_pairs(get_tokenizer("bytes-chat")))
    model = nnx.merge(graphdef, params)
    # chunk=20 over 4 rows: 5 positions a chunk, 48 = 9 chunks + 3 (padding exercised).
    lp, n = jax.jit(lambda p, t: dpo.pair_logps(p, graphdef, t, chunk=20))(params, tokens)
    direct = _naive_logps(model, tokens)
    np.testing.assert_allclose(np.asarray(lp), np.asarray(direct), rtol=2e-6)
    assert (np.asarray(n) > 0).all()
    # The DPO gradient is the chain rule through each answer's log-probability.
    ref = np.asarray(direct) + np.array([[0.3, -0.2], [-0.1, 0.4]], np.float32)
    batch = {"tokens": tokens, "ref": jnp.asarray(ref)}
    loss_fn = lambda p: dpo.dpo_loss(
        p, graphdef, batch, None, True, beta=0.5, label_smoothing=0.0, chunk=20
    )[0]
    g = jax.jit(jax.grad(loss_fn))(params)

    def naive_loss(p):
        lp = _naive_logps(nnx.merge(graphdef, p), tokens)
        return dpo.pair_loss(lp, jnp.asarray(ref), np.ones(2, bool), beta=0.5)[0]

    g_direct = jax.jit(jax.grad(naive_loss))(params)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_direct), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        # float32 sums in another order: close relative to the leaf's scale.
        assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max(), np.abs(a - b).max()


def test_pair_formats_split_and_bad_records(tmp_path):
    tok = get_tokenizer("bytes-chat")
    recs = [{"prompt": f"Say {i}", "chosen": f"{i}.", "rejected": f"No, {i}!"} for i in range(30)]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs))
    pairs, counts = dpo.encode_split(tok, str(path), 64)
    assert counts["train"] + counts["val"] == 30 and pairs["train"].shape[1:] == (2, 65)
    for c, r in pairs["train"]:
        ans = lambda row: tok.decode(row[row >= 0][:-1].tolist())
        assert ans(c).endswith(".") and ans(r).startswith("No, ")
        # The prompt is the same context in both rows of a pair.
        assert (c[: np.flatnonzero(c >= 0)[0]] == r[: np.flatnonzero(r >= 0)[0]]).all()
    messages = [
        {"messages": [{"role": "user", "content": "hi"}], "chosen": "Hello.", "rejected": "What."}
    ]
    path.write_text(json.dumps(messages))
    assert dpo.load_pairs(str(path))[0][0] == messages[0]["messages"]


@pytest.fixture(scope="module")
def sft(tmp_path_factory) -> str:
    """A tiny bytes-chat model finetuned on short instructions: the start and the reference."""
    tmp = tmp_path_factory.mktemp("sft")
    with open(INSTRUCTIONS) as f:
        recs = [r for r in json.load(f) if len(r["instruction"] + r["input"] + r["output"]) < 90]
    path = tmp / "inst.json"
    path.write_text(json.dumps(recs))
    cfg = tiny_config(
        str(path),
        **TINY,
        **{"data.batch_size": 16, "train.steps": 40, "train.eval_every": 0, "train.ckpt_every": 40},
    )
    workdir = str(tmp / "w")
    train.train_and_evaluate(cfg, workdir)
    return workdir


@pytest.fixture(scope="module")
def prefs(tmp_path_factory) -> str:
    """The short pairs of data/'s preference set (they fit SEQ bytes)."""
    with open(PREFS) as f:
        recs = json.load(f)
    short = [
        r for r in recs if len(r["instruction"] + r["input"] + max(r["chosen"], r["rejected"])) < 90
    ]
    path = tmp_path_factory.mktemp("prefs") / "prefs.json"
    path.write_text(json.dumps(short))
    return str(path)


DPO_STEPS = 24
DPO = {
    "data.batch_size": 8,
    "train.steps": DPO_STEPS,
    "train.log_every": 1,
    "train.eval_every": 12,
    "train.ckpt_every": 8,
    "optim.lr": 2e-3,
    "optim.min_lr": 2e-4,
}


@pytest.fixture(scope="module")
def dpo_run(sft, prefs, tmp_path_factory) -> str:
    cfg = tiny_config(prefs, **TINY, **DPO, **{"model.init_from": sft})
    workdir = str(tmp_path_factory.mktemp("dpo") / "w")
    train.train_and_evaluate(cfg, workdir)
    return workdir


def _rows(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_reference_equals_policy_at_step_0(dpo_run):
    first = next(r for r in _rows(dpo_run) if "train/loss" in r)
    assert first["step"] == 1
    # Step 1's metrics are those of the step-0 weights, which are the reference's: exactly.
    assert first["train/margin"] == 0.0 and first["train/chosen_reward"] == 0.0
    assert first["train/rejected_reward"] == 0.0 and first["train/reward_acc"] == 0.5
    assert first["train/loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert os.path.isfile(os.path.join(dpo_run, dpo.REFERENCE_FILE))


def test_reward_accuracy_rises_within_a_few_dozen_steps(dpo_run):
    rows = _rows(dpo_run)
    train_acc = [r["train/reward_acc"] for r in rows if "train/reward_acc" in r]
    evals = [r for r in rows if "eval/reward_acc" in r]
    assert np.mean(train_acc[-8:]) > 0.6
    assert [r["step"] for r in evals] == [12, 24]
    assert evals[-1]["eval/reward_acc"] > 0.6 and evals[-1]["eval/margin"] > 0
    assert evals[-1]["eval/loss"] < math.log(2)


def test_report_counts_a_pair_as_two_sequences(dpo_run, tmp_path):
    from llmjax import report

    run = report.load_run(dpo_run)
    logged = [r["step"] for r in _rows(dpo_run) if "train/loss" in r]
    assert run.series["train/loss"][0] == logged == list(range(1, DPO_STEPS + 1))
    # The trainer's count: pairs x 2 answers x seq_len (the report once plotted half of it).
    per_step = DPO["data.batch_size"] * 2 * SEQ
    assert run.x(logged) == [s * per_step for s in logged]
    assert report.draw([run], str(tmp_path / "dpo.png"))[0] == "loss"


def test_chat_and_evaluate_read_the_result(dpo_run, sft, prefs):
    from llmjax import chat

    model, tok, step = checkpoint.load_model(dpo_run)
    assert step == DPO_STEPS and tok.name == "bytes-chat"
    answer, _ = chat.reply(
        model,
        tok,
        [{"role": "user", "content": "Name a color."}],
        max_new_tokens=40,
        temperature=0.0,
        top_k=0,
        top_p=1.0,
        seed=0,
        stream=False,
    )
    assert "<|end|>" not in answer
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cli = lambda *a: run_json(["-m", "llmjax.evaluate", *a], env, timeout=180)
    held = cli(f"--workdir={dpo_run}", f"--data={prefs}")["held_out"]
    last_eval = [r for r in _rows(dpo_run) if "eval/reward_acc" in r][-1]
    # The CLI scores the held-out pairs as the loop did (float32 sums: a few ulps apart).
    assert held["reward_acc"] == pytest.approx(last_eval["eval/reward_acc"], abs=1e-9)
    assert held["margin"] == pytest.approx(last_eval["eval/margin"], rel=1e-4)
    held = cli(f"--workdir={sft}", f"--data={prefs}", f"--reference={sft}")["held_out"]
    assert held["reward_acc"] == 0.5 and held["margin"] == 0.0


# ---------------------------------------------------------------------------------------------
# The command line: exact resume after SIGKILL, bad input


def _args(workdir, sft, prefs) -> list[str]:
    return [
        sys.executable,
        "-m",
        "llmjax.main",
        f"--config={ROOT}/configs/dpo_gpt2.py",
        f"--workdir={workdir}",
        f"--config.model.init_from={sft}",
        f"--config.data.path={prefs}",
        "--config.model.dtype=float32",
        "--config.train.sample_every=0",
        "--config.train.trackers=none",
        *(f"--config.{k}={v}" for k, v in DPO.items()),
    ]


def _logged(workdir) -> list[tuple]:
    return [
        tuple(sorted((k, v) for k, v in r.items() if not k.startswith("perf/")))
        for r in _rows(workdir)
    ]


def test_sigkill_and_resume_repeat_an_uninterrupted_run(sft, prefs, env, tmp_path):
    ref_dir, killed = str(tmp_path / "reference"), str(tmp_path / "killed")
    proc = subprocess.run(
        _args(ref_dir, sft, prefs), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    at = random.randint(9, DPO_STEPS - 4)  # after the first checkpoint (step 8)
    p = subprocess.Popen(
        _args(killed, sft, prefs), cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE
    )
    for line in p.stdout:
        # Killed at `at` or the first step after it by which a checkpoint has committed: saves are
        # asynchronous, and on a loaded machine step 8's may still be in flight at step `at`.
        done = int(line[5:11]) if line.startswith("step ") and line[11:12] == "/" else 0
        if done >= at and checkpoint.steps_on_disk(checkpoint.directory(killed)):
            p.send_signal(signal.SIGKILL)
            break
    assert p.wait(timeout=60) == -signal.SIGKILL, f"no checkpoint by step {DPO_STEPS}"
    resumed = subprocess.run(
        _args(killed, sft, prefs), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    # The cached reference log-probabilities were read, not computed again.
    assert "reference log-probabilities" not in resumed.stdout
    assert _logged(killed) == _logged(ref_dir), f"killed after step {at}"


PAIR = {"instruction": "Name a color.", "input": "", "chosen": "Blue.", "rejected": "Ugh. Blue."}


@pytest.mark.parametrize(
    "case,needle",
    [
        ("tied", "record 1: chosen and rejected are the same answer"),
        ("missing", "record 1 is not a preference pair"),
        ("mixed", "record 1 is a pair with 'prompt' but record 0 is a pair with 'instruction'"),
        ("mixed_sft", "record 1 is a finetuning example"),
        ("no_chat", "has no chat tokens"),
    ],
)
def test_bad_input_is_one_line_exit_2(case, needle, sft, pretrained_bytes, tmp_path):
    records = {
        "tied": [PAIR, {**PAIR, "rejected": "Blue."}],
        "missing": [PAIR, {"instruction": "Name a color.", "chosen": "Blue."}],
        "mixed": [PAIR, {"prompt": "Name a color.", "chosen": "Blue.", "rejected": "Ugh."}],
        "mixed_sft": [PAIR, {"instruction": "Name a color.", "input": "", "output": "Blue."}],
        "no_chat": [PAIR, PAIR],
    }[case]
    data = tmp_path / "prefs.json"
    data.write_text(json.dumps(records))
    source = pretrained_bytes if case == "no_chat" else sft
    before = {**snapshot(tmp_path), **snapshot(os.path.dirname(source))}
    proc = subprocess.run(
        _args(str(tmp_path / "w"), source, str(data)),
        cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=180,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert 1 <= len(lines) <= 2 and lines[-1].startswith("llmjax: "), proc.stderr[-2000:]
    assert needle in lines[-1], lines[-1]
    assert {**snapshot(tmp_path), **snapshot(os.path.dirname(source))} == before
