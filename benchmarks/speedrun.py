"""The speedrun recipe against GPT-2 + AdamW, measured on CPU (issue 16).

Byte-level tiny Shakespeare (tests/fixtures, the last 10% held out), 4 layers x 128 wide,
context 128, 32 sequences per step, 500 steps, validation every 25 steps, both on warm-up then
decay (cosine for the baseline, warm-up/stable/decay for the recipe). The baseline is GPT-2 + AdamW
at the best learning rate of a small sweep (one seed); the candidate is configs/speedrun_tiny.py's
architecture and optimizer at the baseline's AdamW rate. Reports each curve, the final validation
losses, the steps the candidate needs to reach the baseline's final loss, ms per step, and with
--ablation the recipe's changes added one at a time. One JSON object on the last line.

    python benchmarks/speedrun.py                       # sweep, baseline and candidate, 3 seeds
    python benchmarks/speedrun.py --seeds=0 --ablation  # + each change on its own, one seed
    python benchmarks/speedrun.py --corpus=pydocs --seeds=0 --lrs=3e-3,5e-3,1e-2  # other text
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from llmjax.batches import objective  # noqa: E402
from llmjax.config import load, validate  # noqa: E402
from llmjax.train import build  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("steps", 500, "optimizer steps per run")
flags.DEFINE_integer("eval_every", 25, "steps between validation losses")
flags.DEFINE_list("seeds", ["0", "1", "2"], "seeds of the baseline and candidate runs")
flags.DEFINE_list("lrs", ["1e-3", "3e-3", "5e-3", "1e-2"], "baseline AdamW sweep (seed 0)")
flags.DEFINE_float("baseline_lr", 0.0, "skip the sweep and use this rate (0 = sweep)")
flags.DEFINE_bool("ablation", False, "also add the recipe's changes one at a time (first seed)")
flags.DEFINE_enum(
    "corpus",
    "shakespeare",
    ["shakespeare", "pydocs"],
    "byte-level text: the Shakespeare fixture "
    "or the first 400 KB of Python's documentation (does the recipe win on other text too?)",
)

B, T, VAL_BATCHES = 32, 128, 4
# The recipe's changes in the order of modded-nanogpt's record log, each on top of the ones above.
ABLATION = [
    ("+ Muon", {"optim.name": "muon"}),
    (
        "+ wsd schedule, momentum warm-up",
        {"optim.schedule": "wsd", "optim.muon_momentum_warmup": 300},
    ),
    ("+ rotary", {"model.position": "rope"}),
    ("+ RMSNorm (no parameters)", {"model.norm": "rmsnorm"}),
    ("+ QK-norm", {"model.qk_norm": True}),
    ("+ ReLU^2", {"model.mlp": "relu2"}),
    ("+ no biases", {"model.bias": False}),
    ("+ untied zero-init head", {"model.tie_embeddings": False}),
    ("+ zero-init projections", {"model.zero_init_proj": True}),
    ("+ logit soft-cap 15", {"model.logit_cap": 15.0}),
    ("+ x0 shortcut", {"model.x0_mix": True}),
]
RECIPE_KEYS = [
    "model.position", "model.norm", "model.qk_norm", "model.mlp", "model.bias",
    "model.tie_embeddings", "model.zero_init_proj", "model.logit_cap", "model.x0_mix",
    "optim.name", "optim.muon_lr", "optim.muon_momentum_warmup", "optim.schedule",
    "optim.decay_frac",
]  # fmt: skip


def _load(name: str):
    return load(os.path.join(ROOT, "configs", name + ".py"))


def _set(cfg, overrides: dict):
    for key, value in overrides.items():
        group, name = key.split(".")
        cfg[group][name] = value
    return cfg


def baseline_config(lr: float, seed: int, steps: int):
    """configs/quickstart.py (GPT-2 + AdamW) at the benchmark's batch, context and length."""
    c = _load("quickstart")
    c.data.batch_size, c.data.seq_len, c.model.block_size = B, T, T
    c.optim.lr, c.optim.min_lr, c.optim.warmup_steps = lr, lr / 10, steps // 10
    c.train.steps, c.train.seed = steps, seed
    return c


def recipe_overrides() -> dict:
    tiny = _load("speedrun_tiny")
    return {k: tiny[k.split(".")[0]][k.split(".")[1]] for k in RECIPE_KEYS}


def corpus():
    if FLAGS.corpus == "pydocs":  # Python's own documentation: prose and code, not verse
        from llmjax.prepare.sources import pydocs_documents

        raw = "\n\n".join(pydocs_documents()).encode("utf-8")[:400_000]
    else:
        with open(os.path.join(ROOT, "tests", "fixtures", "tinyshakespeare_400k.txt"), "rb") as f:
            raw = f.read()
    data = np.frombuffer(raw, np.uint8).astype(np.int32)
    split = int(len(data) * 0.9)
    train, val = data[:split], data[split:]
    starts = np.arange(VAL_BATCHES * B) * (T + 1)
    val_batches = val[starts[:, None] + np.arange(T + 1)].reshape(VAL_BATCHES, B, T + 1)
    return train, val_batches


def run(cfg, train, val_batches) -> dict:
    """One training run: validation curve, final loss, ms per step (compilation excluded)."""
    validate(cfg)
    r = build(cfg, objective(cfg, "pretrain"), jax.devices()[:1])
    state = jax.jit(r.init, out_shardings=r.state_shardings)()
    rng = np.random.default_rng(cfg.train.seed)

    def val_loss(params):
        s = n = 0.0
        for vb in val_batches:
            total, (count, _) = r.eval_step(params, jnp.asarray(vb))
            s, n = s + float(total), n + float(count)
        return s / n

    curve, step_s = [], 0.0
    for step in range(1, cfg.train.steps + 1):
        starts = rng.integers(0, len(train) - T - 1, B)
        batch = jnp.asarray(train[starts[:, None] + np.arange(T + 1)])
        t0 = time.perf_counter()
        state, metrics = r.train_step(state, batch)
        if step == 1 or step % FLAGS.eval_every == 0:
            jax.block_until_ready(metrics)
        if step > 1:
            step_s += time.perf_counter() - t0
        if step % FLAGS.eval_every == 0:
            curve.append((step, round(val_loss(state.params), 4)))
    result = {
        "curve": curve,
        "final_val": curve[-1][1],
        "ms_per_step": round(1000 * step_s / (cfg.train.steps - 1), 1),
    }
    # Each run's curve as it finishes: an hour-long sweep is not lost to a late failure.
    print(json.dumps({"seed": cfg.train.seed, "lr": cfg.optim.lr, **result}), file=sys.stderr)
    return result


def steps_to_reach(curve, target: float) -> int | None:
    return next((s for s, v in curve if v <= target), None)


def main(argv) -> None:
    del argv
    train, val_batches = corpus()
    seeds, steps = [int(s) for s in FLAGS.seeds], FLAGS.steps
    log = lambda *a: print(*a, file=sys.stderr, flush=True)
    sweep = {}
    if FLAGS.baseline_lr:
        best_lr = FLAGS.baseline_lr
    else:
        for lr in (float(x) for x in FLAGS.lrs):
            sweep[lr] = run(baseline_config(lr, seeds[0], steps), train, val_batches)
            log(f"sweep lr={lr:g}: val {sweep[lr]['final_val']}, {sweep[lr]['ms_per_step']} ms")
        best_lr = min(sweep, key=lambda lr: sweep[lr]["final_val"])
    recipe = recipe_overrides()
    baseline, candidate = {}, {}
    for seed in seeds:
        if seed == seeds[0] and best_lr in sweep:
            baseline[seed] = sweep[best_lr]
        else:
            baseline[seed] = run(baseline_config(best_lr, seed, steps), train, val_batches)
        candidate[seed] = run(
            _set(baseline_config(best_lr, seed, steps), recipe), train, val_batches
        )
        b, c = baseline[seed]["final_val"], candidate[seed]["final_val"]
        log(f"seed {seed}: baseline {b}, recipe {c}")
    target = float(np.mean([baseline[s]["final_val"] for s in seeds]))
    reach = [steps_to_reach(candidate[s]["curve"], target) for s in seeds]
    ablation = []
    if FLAGS.ablation:
        cfg_overrides = {}
        for name, change in ABLATION:
            cfg_overrides.update(change)
            cfg = _set(baseline_config(best_lr, seeds[0], steps), cfg_overrides)
            res = run(cfg, train, val_batches)
            ablation.append(
                {"change": name, **res, "steps_to_baseline": steps_to_reach(res["curve"], target)}
            )
            log(f"{name}: val {res['final_val']}, {res['ms_per_step']} ms")
    ms = lambda d: float(np.mean([d[s]["ms_per_step"] for s in seeds]))
    mean_reach = None if None in reach else float(np.mean(reach))
    print(
        json.dumps(
            {
                "steps": steps,
                "seeds": seeds,
                "device": jax.devices()[0].device_kind,
                "corpus": FLAGS.corpus,
                "sweep": {f"{lr:g}": v["final_val"] for lr, v in sweep.items()},
                "baseline_lr": best_lr,
                "recipe": recipe,
                "baseline_final_val": [baseline[s]["final_val"] for s in seeds],
                "candidate_final_val": [candidate[s]["final_val"] for s in seeds],
                "baseline_mean_final_val": round(target, 4),
                "candidate_mean_final_val": round(
                    float(np.mean([candidate[s]["final_val"] for s in seeds])), 4
                ),
                "candidate_steps_to_baseline": reach,
                "token_ratio": None if mean_reach is None else round(steps / mean_reach, 2),
                "baseline_ms_per_step": ms(baseline),
                "candidate_ms_per_step": ms(candidate),
                "time_ratio": round(ms(candidate) / ms(baseline), 3),
                "ablation": ablation,
                "curves": {
                    "baseline": {s: baseline[s]["curve"] for s in seeds},
                    "candidate": {s: candidate[s]["curve"] for s in seeds},
                },
            }
        )
    )


if __name__ == "__main__":
    app.run(main)
