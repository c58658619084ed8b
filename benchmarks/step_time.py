"""Training-step time of llmjax: ms/step, tokens/s, MFU and peak device memory; one JSON line last.

    python benchmarks/step_time.py --config=configs/gpt2_124m.py --batch_size=32 --seq_len=1024 \
        --steps=50 [--config.model.scan_layers=True --config.model.remat=dots_saveable]

Times the pretraining run's `train_step` (the real jitted step: AdamW, clipping, non-finite guard)
on one device-resident random batch, so input loading is excluded. Compilation and `--warmup`
steps are not timed; each timed step is waited for, and the median is reported. --batch_size is
the global batch per optimizer step (split into optim.grad_accum micro-batches).
MFU = tokens/s x (6N + 6*L*D*T) / (peak FLOP/s x devices), the llm.c count, with the dense bf16 peak
of metrics.PEAK_FLOPS (H100 SXM: 989e12); null on devices without a known peak (CPU).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

# This checkout's llmjax, whatever is installed (the script runs as `python benchmarks/...`).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from llmjax import config as config_lib  # noqa: E402
from llmjax import xla_flags  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
    config_flags.DEFINE_config_file("config", None, "config file (configs/*.py)")
    flags.DEFINE_integer("batch_size", None, "global sequences per step (default: the config's)")
    flags.DEFINE_integer("seq_len", None, "tokens per sequence (default: the config's)")
    flags.DEFINE_integer("steps", 20, "timed steps (the median is reported)")
    flags.DEFINE_integer("warmup", 3, "untimed steps after compilation")
    flags.mark_flags_as_required(["config"])


def apply_overrides(cfg, batch_size: int | None, seq_len: int | None):
    if batch_size:
        cfg.data.batch_size = batch_size
    if seq_len:
        cfg.data.seq_len = seq_len
        cfg.model.block_size = max(cfg.model.block_size, seq_len)
    try:
        config_lib.validate(cfg)
    except config_lib.ConfigError as e:
        print(f"step_time: config: {e}", file=sys.stderr)
        sys.exit(2)
    return cfg


def peak_memory_bytes(device) -> int | None:
    stats = device.memory_stats()  # None on CPU
    return None if not stats else stats.get("peak_bytes_in_use")


def benchmark(cfg, steps: int, warmup: int) -> dict:
    """Times llmjax's train step for `cfg`; returns the figures (see the module docstring)."""
    import jax
    import numpy as np

    from llmjax import batches, metrics, sharding, train
    from llmjax.model import flops_per_token

    B, T = cfg.data.batch_size, cfg.data.seq_len
    run = train.build(cfg, batches.objective(cfg, "pretrain"))
    state = run.init()
    rng = np.random.default_rng(0)
    batch = sharding.put_batch(
        rng.integers(0, run.model_cfg.valid_vocab_size, (B, T + 1), dtype=np.int32), run.mesh
    )
    t0 = time.perf_counter()
    step = run.train_step.lower(run.abstract_state, batch).compile()
    compile_s = time.perf_counter() - t0
    mem = step.memory_analysis()
    compiled_bytes = (
        None
        if mem is None
        else (
            mem.argument_size_in_bytes
            + mem.output_size_in_bytes
            + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes
        )
    )
    for _ in range(warmup):
        state, m = step(state, batch)
    first_loss = float(m["train/loss"]) if warmup else None
    jax.block_until_ready(state)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready((state, m))
        times.append(time.perf_counter() - t)
    ms = 1e3 * statistics.median(times)
    tokens_per_sec = B * T / (ms / 1e3)
    n_params = sum(x.size for x in jax.tree.leaves(run.abstract_state.params))
    fpt = flops_per_token(run.model_cfg, n_params, T)
    device = jax.devices()[0]
    peak = metrics.peak_flops(device)
    mfu = tokens_per_sec * fpt / (peak * jax.device_count()) if peak else None
    return {
        "framework": "llmjax",
        "device": device.device_kind,
        "backend": jax.default_backend(),
        "n_devices": jax.device_count(),
        "jax": jax.__version__,
        "batch_size": B,
        "seq_len": T,
        "grad_accum": cfg.optim.grad_accum,
        "n_layer": cfg.model.n_layer,
        "n_embd": cfg.model.n_embd,
        "n_params": n_params,
        "dtype": cfg.model.dtype,
        "attention": run.model_cfg.attention,
        "scan_layers": run.model_cfg.scan_layers,
        "remat": run.model_cfg.remat,
        "steps": steps,
        "warmup": warmup,
        "compile_s": round(compile_s, 2),
        "ms_per_step": ms,
        "ms_per_step_min": 1e3 * min(times),
        "ms_per_step_max": 1e3 * max(times),
        "tokens_per_sec": tokens_per_sec,
        "flops_per_token": fpt,
        "peak_flops": peak,
        "mfu": mfu,
        "peak_memory_bytes": peak_memory_bytes(device),
        "compiled_memory_bytes": compiled_bytes,
        "loss_first": first_loss,
        "loss_last": float(m["train/loss"]),
    }


def report(r: dict) -> None:
    name = r["framework"]
    print(
        f"{name}: {r['device']} x{r.get('n_devices', 1)}, B={r['batch_size']} T={r['seq_len']}, "
        f"{r['n_params']:,} params, {r['dtype']}, median of {r['steps']} steps "
        f"(after {r['warmup']} warm-up)"
    )
    print(
        f"{name}: {r['ms_per_step']:.2f} ms/step (min {r['ms_per_step_min']:.2f}, max "
        f"{r['ms_per_step_max']:.2f}), {r['tokens_per_sec']:,.0f} tokens/s"
    )
    fpt = r["flops_per_token"]
    if r["mfu"] is None:
        print(
            f"{name}: MFU n/a (no known peak for {r['device']}); {fpt:,.0f} FLOP/token "
            "= 6N + 6*L*D*T"
        )
    else:
        print(
            f"{name}: MFU {100 * r['mfu']:.1f}% = tokens/s x {fpt:,.0f} FLOP/token "
            f"(6N + 6*L*D*T) / ({r['peak_flops']:.3g} FLOP/s dense bf16 x devices)"
        )
    peak = r["peak_memory_bytes"]
    compiled = r.get("compiled_memory_bytes")
    print(
        f"{name}: peak device memory "
        + (f"{peak / 2**30:.2f} GiB" if peak else "n/a (no device.memory_stats)")
        + (f"; compiled step needs {compiled / 2**30:.3f} GiB" if compiled else "")
    )


def main(argv: list[str]) -> None:
    del argv
    xla_flags.apply()  # before jax starts a backend
    cfg = apply_overrides(FLAGS.config, FLAGS.batch_size, FLAGS.seq_len)
    r = benchmark(cfg, FLAGS.steps, FLAGS.warmup)
    report(r)
    print(json.dumps(r))


if __name__ == "__main__":
    define_flags()
    app.run(main)
