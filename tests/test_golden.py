"""Golden losses: the first logged steps of configs/tiny.py on the Shakespeare fixture, float32.

Pinned to the exact float32 values the training loop logged before the modules were reorganised
(issue 12): moving code between modules must not change a single bit of what a run computes.
"""

import json

import jax

from llmjax import train
from tests.conftest import tiny_config

# Recorded with jax 0.10.2 on CPU; XLA's CPU float32 kernels are deterministic for a fixed version.
# The chunked loss (issue 15) first moved steps 1 and 3 by 1 and 2 ulps (a one-pass logsumexp
# sums in another order); on CPU it now reduces max-then-sum as optax does, which put step 1 back
# on its first value (step 3 stays 2 ulps off). Float64 puts step 1 at 5.5358966637.
GOLDEN_TRAIN = [
    5.5358967781066895,
    5.570910453796387,
    5.291813850402832,
    5.007684707641602,
    4.947444915771484,
]
# The loop's eval loss was summed in float32 (4.822039604187012) while `llmjax.evaluate` summed in
# float64; both now share evaluate.mean_loss (float64 on the host): the value below is the float64
# ratio of the same per-batch float32 sums, 2.4e-7 away.
# jax 0.12's XLA sums the chunked eval loss's float32 pieces in another order (the train losses
# above agree to the bit): 1 ulp of float32 apart, each exact for its version.
GOLDEN_EVAL = {"0.10": 4.822039365768433, "0.12": 4.822039604187012}


def test_first_losses_bit_for_bit(byte_data, tmp_path):
    cfg = tiny_config(
        byte_data,
        **{"train.steps": 5, "train.log_every": 1, "train.eval_every": 5, "train.ckpt_every": 5},
    )
    train.train_and_evaluate(cfg, str(tmp_path / "w"))
    with open(tmp_path / "w" / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["train/loss"] for r in rows if "train/loss" in r] == GOLDEN_TRAIN
    evals = [r["eval/loss"] for r in rows if "eval/loss" in r]
    minor = ".".join(jax.__version__.split(".")[:2])
    # A version not recorded yet must still land on one of the recorded bit patterns.
    assert (
        evals == [GOLDEN_EVAL[minor]] if minor in GOLDEN_EVAL else evals[0] in GOLDEN_EVAL.values()
    )
