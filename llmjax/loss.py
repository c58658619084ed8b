"""The language-model loss: summed cross-entropy over the scored targets of a batch.

One function serves pretraining, finetuning, the train step and evaluation. A batch is
[B, T+1] token ids; a negative id -1-t is token t read as context but never scored as a target
(prompt and padding in finetuning batches, see instruct.py); pretraining batches score every
target. Returning (sum, count) rather than a mean keeps means exact across micro-batches,
devices and evaluation batches: sum the pairs, divide once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def lm_loss(
    params, graphdef, batch_BT1: jax.Array, rng: jax.Array | None, deterministic: bool
) -> tuple[jax.Array, jax.Array]:
    """(summed cross-entropy over scored targets, number of scored targets), both float32."""
    tokens_BT1 = jnp.where(batch_BT1 < 0, -1 - batch_BT1, batch_BT1)
    weights_BT = (batch_BT1[:, 1:] >= 0).astype(jnp.float32)
    model = nnx.merge(graphdef, params)
    rngs = None if deterministic else nnx.Rngs(dropout=rng)
    logits_BTV = model(tokens_BT1[:, :-1], deterministic=deterministic, rngs=rngs)
    # Logits arrive in float32 whatever the compute dtype: the softmax and loss stay exact.
    ce_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, tokens_BT1[:, 1:])
    return (ce_BT * weights_BT).sum(), weights_BT.sum()
