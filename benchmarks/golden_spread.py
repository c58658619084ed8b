"""How far tests/test_golden.py's losses move across CPUs, against how far a real change moves them.

XLA:CPU generates code for the host's instruction set, and another vector width sums in another
order, so the golden run's float32 losses differ in their last bits from one processor to the next.
This script measures that spread (one child process per `--xla_cpu_max_isa`, which reproduces any
x86 CPU on this one) and, on the host's own instruction set, the size of the smallest real changes
the golden test exists to catch. The golden test's tolerance must sit well between the two.

    python benchmarks/golden_spread.py

Prints one line per run, then one JSON object on the last line: the largest absolute difference
from the golden values (train and eval losses) per instruction set and per change.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

ISAS = ["SSE4_2", "AVX", "AVX2", "AVX512"]
# The real changes, each the smallest of its kind a code move could plausibly introduce.
CHANGES = {
    "skipped_step": "step 2's update is dropped (the state after step 1 goes on to step 3)",
    "init_seed": "train.seed 1 instead of 0",
    "loss_count": "the loss sum divided by one token more than it scored",
    "lr_1pct": "optim.lr 1% higher",
}


def host_has_avx512() -> bool:
    with open("/proc/cpuinfo") as f:
        return "avx512f" in f.read()


def child(data: str, change: str, workdir: str) -> None:
    """One golden run (tests/test_golden.py's config), with `change` applied; prints its losses."""
    import jax
    import jax.numpy as jnp

    from llmjax import train
    from tests.test_golden import golden_config

    cfg = golden_config(data)
    if change == "init_seed":
        cfg.train.seed = 1
    elif change == "lr_1pct":
        cfg.optim.lr *= 1.01
    elif change == "loss_count":
        lm_loss = train.lm_loss
        train.lm_loss = lambda *a, **k: (lambda s, n: (s, n + 1))(*lm_loss(*a, **k))
    elif change == "skipped_step":
        compile_step = train.compile_train_step

        def compile_skipping(*args):
            step, calls = compile_step(*args), [0]

            def skipping(state, batch):
                calls[0] += 1
                if calls[0] != 2:
                    return step(state, batch)
                kept = jax.tree.map(jnp.copy, state)  # the step donates its input
                new, m = step(state, batch)
                return kept.replace(step=new.step), m

            return skipping

        train.compile_train_step = compile_skipping
    train.train_and_evaluate(cfg, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    out = {
        "train": [r["train/loss"] for r in rows if "train/loss" in r],
        "eval": [r["eval/loss"] for r in rows if "eval/loss" in r],
    }
    print(json.dumps(out))


def run(data: str, change: str, isa: str | None, tmp: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    flags = env.get("XLA_FLAGS", "")
    if isa:
        env["XLA_FLAGS"] = f"{flags} --xla_cpu_max_isa={isa}".strip()
    workdir = os.path.join(tmp, f"{change}_{isa or 'default'}")
    cmd = [sys.executable, __file__, "--child", change, "--data", data, "--workdir", workdir]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        sys.exit(f"{change} {isa}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def max_diff(got: dict, train_ref: list[float], eval_ref: float) -> float:
    diffs = [abs(a - b) for a, b in zip(got["train"], train_ref, strict=True)]
    return max(diffs + [abs(got["eval"][0] - eval_ref)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.data, args.child, args.workdir)

    from llmjax.prepare import prepare
    from tests.conftest import FIXTURES, write_docs
    from tests.test_golden import GOLDEN_EVAL, GOLDEN_TRAIN

    isas = [None] + [i for i in ISAS if i != "AVX512" or host_has_avx512()]
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(FIXTURES, "tinyshakespeare_400k.txt"), encoding="utf-8") as f:
            text = f.read()
        pattern = write_docs(os.path.join(tmp, "docs"), text[:400_000], 40)
        data = os.path.join(tmp, "shards")
        prepare(f"text:{pattern}", data, tokenizer="bytes", val_fraction=0.1)
        spread, changes = {}, {}
        for isa in isas:
            got = run(data, "none", isa, tmp)
            spread[isa or "default"] = max_diff(got, GOLDEN_TRAIN, GOLDEN_EVAL)
            print(f"isa {isa or 'default':>8}: {got}", flush=True)
        for change in CHANGES:
            got = run(data, change, None, tmp)
            changes[change] = max_diff(got, GOLDEN_TRAIN, GOLDEN_EVAL)
            print(f"change {change:>12}: {got}", flush=True)
    print(
        json.dumps(
            {
                "isa_max_abs_diff": spread,
                "change_max_abs_diff": changes,
                "spread": max(spread.values()),
                "smallest_change": min(changes.values()),
            }
        )
    )


if __name__ == "__main__":
    main()
