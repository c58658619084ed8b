"""Training throughput as the device count grows: tokens/s, tokens/s per device, MFU, efficiency.

    python benchmarks/scaling.py --config=configs/gpt2_124m.py --devices=1,2,4,8

Weak scaling: each device gets --batch_per_device sequences, so ideal tokens/s grows linearly and
scaling efficiency = (tokens/s per device) / (tokens/s per device at the smallest count). Each
count n trains on the first n devices with the config's mesh (its -1 axis takes what is left),
on random tokens, so the loader is not measured. One process; multi-host throughput is what
`llmjax.main` logs. Without accelerators the devices are fake CPU devices: a smoke run.
Prints a table, then one JSON object on its last line.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "config file (configs/*.py)")
flags.DEFINE_list("devices", ["1", "2", "4", "8"], "device counts to measure")
flags.DEFINE_integer(
    "batch_per_device",
    0,
    "sequences per device per step (0: the config's "
    "data.batch_size / optim.grad_accum / the largest count)",
)
flags.DEFINE_integer("steps", 10, "timed steps per device count")
flags.DEFINE_integer("warmup", 2, "untimed steps after compiling")
flags.mark_flags_as_required(["config"])

FORMULA = (
    "MFU = (6N + 6*L*C*T) * tokens/s / (devices * peak dense bf16 FLOP/s): FLOPs per token "
    "as llm.c counts them (N parameters incl. padded vocab, L layers, C width, T sequence)"
)


def _fail(msg: str) -> None:
    print(f"scaling: {msg}", file=sys.stderr)
    sys.exit(2)


def measure(cfg, n: int, batch_per_device: int, steps: int, warmup: int) -> dict:
    import jax
    import numpy as np

    from llmjax import batches, metrics, sharding, train
    from llmjax.model import flops_per_token

    cfg = cfg.copy_and_resolve_references()
    cfg.data.batch_size, cfg.optim.grad_accum = batch_per_device * n, 1
    run = train.build(cfg, batches.objective(cfg, "pretrain"), jax.devices()[:n])
    B, T = cfg.data.batch_size, cfg.data.seq_len
    tokens = np.random.default_rng(0).integers(0, run.model_cfg.valid_vocab_size, (B, T + 1))
    batch = sharding.put_batch(tokens.astype(np.int32), run.mesh)
    state = run.init()
    t0 = time.perf_counter()
    step = run.train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        state, m = step(state, batch)
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = step(state, batch)
    jax.block_until_ready((state, m))
    elapsed = time.perf_counter() - t0
    tps = steps * B * T / elapsed
    n_params = sum(x.size for x in jax.tree.leaves(run.abstract_state.params))
    fpt = flops_per_token(run.model_cfg, n_params, T)
    peak = metrics.peak_flops(jax.devices()[0])
    return {
        "devices": n,
        "mesh": dict(run.mesh.shape),
        "batch": B,
        "seq_len": T,
        "n_params": n_params,
        "flops_per_token": fpt,
        "step_ms": 1e3 * elapsed / steps,
        "compile_s": compile_s,
        "tokens_per_sec": tps,
        "tokens_per_sec_per_device": tps / n,
        "mfu": fpt * tps / (n * peak) if peak else None,
        "loss": float(m["train/loss"]),
    }


def main(argv: list[str]) -> None:
    del argv
    try:
        counts = sorted({int(d) for d in FLAGS.devices})
    except ValueError:
        _fail(f"--devices={','.join(FLAGS.devices)}: expected comma-separated integers")
    if not counts or counts[0] < 1:
        _fail(f"--devices={','.join(FLAGS.devices)}: counts must be >= 1")
    # Must precede JAX's start: without accelerators, the CPU then shows max(counts) devices.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={counts[-1]}"
    )
    import jax

    from llmjax import config, metrics

    cfg = FLAGS.config
    try:
        config.validate(cfg)
    except config.ConfigError as e:
        _fail(f"config: {e}")
    if jax.device_count() < counts[-1]:
        _fail(
            f"--devices asks for {counts[-1]} devices but {jax.device_count()} "
            f"{jax.default_backend()} devices are available"
        )
    bpd = FLAGS.batch_per_device or max(
        1, cfg.data.batch_size // cfg.optim.grad_accum // counts[-1]
    )
    device = jax.devices()[0]
    rows, skipped = [], []
    for n in counts:
        try:
            rows.append(measure(cfg, n, bpd, FLAGS.steps, FLAGS.warmup))
        except config.ConfigError as e:  # e.g. mesh.tensor=2 on one device
            skipped.append({"devices": n, "reason": str(e)})
            print(f"{n} devices skipped: {e}", flush=True)
    if not rows:
        _fail("no device count could run; see the reasons above")
    base = rows[0]["tokens_per_sec_per_device"]
    for r in rows:
        r["scaling_efficiency"] = r["tokens_per_sec_per_device"] / base

    print(
        f"{device.device_kind} ({jax.default_backend()}), jax {jax.__version__}; "
        f"{bpd} sequences x {rows[0]['seq_len']} tokens per device; "
        f"{rows[0]['n_params']:,} parameters"
    )
    print(
        f"{'devices':>7} {'mesh':>18} {'tokens/s':>12} {'tok/s/dev':>11} {'MFU':>6} "
        f"{'efficiency':>10} {'step ms':>9} {'compile s':>9}"
    )
    for r in rows:
        mesh = "x".join(str(v) for v in r["mesh"].values())
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(
            f"{r['devices']:>7} {mesh + ' (d,f,t)':>18} {r['tokens_per_sec']:>12,.0f} "
            f"{r['tokens_per_sec_per_device']:>11,.0f} {mfu:>6} "
            f"{r['scaling_efficiency']:>10.2f} {r['step_ms']:>9.1f} {r['compile_s']:>9.1f}"
        )
    print(FORMULA)
    print(
        json.dumps(
            {
                "benchmark": "scaling",
                "device_kind": device.device_kind,
                "backend": jax.default_backend(),
                "jax": jax.__version__,
                "peak_flops_per_device": metrics.peak_flops(device),
                "mfu_formula": FORMULA,
                "batch_per_device": bpd,
                "steps": FLAGS.steps,
                "results": rows,
                "skipped": skipped,
            }
        )
    )


if __name__ == "__main__":
    app.run(main)
