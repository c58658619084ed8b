"""Golden losses: the first logged steps of configs/tiny.py on the Shakespeare fixture, float32.

Pinned to the float32 values the training loop logged before the modules were reorganised (issue
12): moving code between modules must not change what a run computes.
"""

import json

from llmjax import train
from tests.conftest import tiny_config

# Recorded with jax 0.10.2 and 0.12 on an AVX-512 CPU (the same bits for both versions).
GOLDEN_TRAIN = [
    5.535897254943848,
    5.570910453796387,
    5.291812896728516,
    5.007684707641602,
    4.947444915771484,
]
# The float64 ratio (evaluate.mean_loss, on the host) of the per-batch float32 sums.
GOLDEN_EVAL = 4.822039604187012
# XLA:CPU generates code for the host's instruction set, and another vector width sums in another
# order, so the last bits depend on the processor. benchmarks/golden_spread.py measured (2026-12-07,
# AMD EPYC with AVX2, jax 0.10.2) the largest distance from these values over the six losses:
# 9.5e-7 (2 float32 ulps at 5.3) under --xla_cpu_max_isa=SSE4_2, AVX, AVX2 and the default alike,
# 0 on the AVX-512 machine that recorded them. The smallest real change it tried moved a loss by
# 4.2e-3 (optim.lr 1% higher; a loss divided by one token too many: 2.2e-2, another init seed:
# 7.9e-2, one update dropped: 2.6e-1). The tolerance sits a factor ~50 above the spread and ~80
# below the smallest change.
TOLERANCE = 5e-5


def golden_config(data_path: str):
    return tiny_config(
        data_path,
        **{"train.steps": 5, "train.log_every": 1, "train.eval_every": 5, "train.ckpt_every": 5},
    )


def test_first_losses_match_the_recorded_run(byte_data, tmp_path):
    train.train_and_evaluate(golden_config(byte_data), str(tmp_path / "w"))
    with open(tmp_path / "w" / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    evals = [r["eval/loss"] for r in rows if "eval/loss" in r]
    assert len(losses) == len(GOLDEN_TRAIN) and len(evals) == 1
    for got, want in zip(losses + evals, GOLDEN_TRAIN + [GOLDEN_EVAL], strict=True):
        assert abs(got - want) <= TOLERANCE, (losses, evals)
