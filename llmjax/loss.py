"""The language-model loss: summed cross-entropy over the scored targets of a batch.

One function serves pretraining, finetuning, the train step and evaluation. A batch is
[B, T+1] token ids; a negative id -1-t is token t read as context but never scored as a target
(prompt and padding in finetuning batches, see instruct.py); pretraining batches score every
target. Returning (sum, count) rather than a mean keeps means exact across micro-batches,
devices and evaluation batches: sum the pairs, divide once.

The LM head and the cross-entropy run chunk by chunk over the sequence (`chunked_ce`), so the
[B, T, V] logits never exist: at GPT-2's vocabulary they outweigh the whole transformer's saved
activations and a third of the step's memory traffic. Under differentiation each chunk's softmax
gradient is formed while its logits are at hand and pushed through the head's two backward matmuls
at once (as llm.c and Liger's fused linear cross-entropy do): the backward pass only scales the
saved gradients, and nothing is recomputed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from llmjax.config import CHUNK_TOKENS
from llmjax.model import MASKED_LOGIT, constrain, soft_cap

# Groups of the vocabulary reduced separately, then combined (see _one_pass): a multiple of
# any tensor-parallel size, so that each device's slice holds whole groups.
VOCAB_GROUPS = 64


def lm_loss(
    params,
    graphdef,
    batch_BT1: jax.Array,
    rng: jax.Array | None,
    deterministic: bool,
    *,
    chunk: int = CHUNK_TOKENS,
    z_loss: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """(summed cross-entropy over scored targets, number of scored targets), both float32.

    `chunk`: tokens per LM-head chunk (see `chunked_ce`); `z_loss`: weight of PaLM's
    log(Z)^2 term, added to each scored target's loss (0 = plain cross-entropy)."""
    model, x_BTD, targets_BT, weights_BT = read_batch(
        params, graphdef, batch_BT1, rng, deterministic
    )
    ce = chunked_ce(
        x_BTD,
        model.head_VD(),
        targets_BT,
        weights_BT,
        valid_vocab=model.cfg.valid_vocab_size,
        chunk=chunk,
        z_loss=z_loss,
        logit_cap=model.cfg.logit_cap,
    )
    return ce, weights_BT.sum()


@dataclasses.dataclass(frozen=True)
class Objective:
    """What a run minimises and how it is fed, built by the module that owns it (`language_model`
    here; instruct.objective, dpo.objective) and given to train.build.

    `loss` (training) and `eval_loss` (validation, no dropout): (params, graphdef, batch, rng,
    deterministic, *, chunk) -> (loss summed over the batch's units, (number of units, {metric:
    sum over the units})). Units are scored targets for the language-model loss, pairs for DPO;
    sums rather than means keep every mean exact across micro-batches, devices and evaluation
    batches."""

    kind: str  # pretrain | instruct | preference: what the run trains on, stored in its record
    loss: Callable[..., tuple[jax.Array, tuple[jax.Array, dict[str, jax.Array]]]]
    eval_loss: Callable[..., tuple[jax.Array, tuple[jax.Array, dict[str, jax.Array]]]]
    # (rows B, tokens per row T+1, sharding) -> the global batch's ShapeDtypeStructs (a pytree)
    batch_spec: Callable[[int, int, Any], Any]
    sequences_per_row: int = 1  # tokens per step = rows x this x seq_len (a DPO pair is two)
    # What must exist before step 1 (DPO's reference log-probabilities): (run, data, params,
    # workdir, fresh) -> the data, completed; None = nothing.
    prepare: Callable[..., Any] | None = None


def lm_objective(params, graphdef, batch_BT1, rng, deterministic, *, chunk: int, z_loss: float):
    """lm_loss as an objective: no metrics besides the loss."""
    loss_sum, n = lm_loss(
        params, graphdef, batch_BT1, rng, deterministic, chunk=chunk, z_loss=z_loss
    )
    return loss_sum, (n, {})


def language_model(kind: str = "pretrain", z_loss: float = 0.0) -> Objective:
    """The language-model loss over a batch's scored targets (every one for pretraining shards,
    the answers for instruction rows); validation leaves out the z-loss, as evaluate's does."""
    return Objective(
        kind=kind,
        loss=functools.partial(lm_objective, z_loss=z_loss),
        eval_loss=functools.partial(lm_objective, z_loss=0.0),
        batch_spec=lambda B, T1, sh: jax.ShapeDtypeStruct((B, T1), jnp.int32, sharding=sh),
    )


def read_batch(
    params, graphdef, batch_BT1: jax.Array, rng: jax.Array | None, deterministic: bool
) -> tuple:
    """(model, final hidden states [B, T, D], targets [B, T], float32 target weights [B, T]) of a
    batch in the context-only encoding: what every objective (this loss, DPO's) scores."""
    tokens_BT1 = jnp.where(batch_BT1 < 0, -1 - batch_BT1, batch_BT1)
    weights_BT = (batch_BT1[:, 1:] >= 0).astype(jnp.float32)
    model = nnx.merge(graphdef, params)
    rngs = None if deterministic else nnx.Rngs(dropout=rng)
    x_BTD = model.hidden(tokens_BT1[:, :-1], deterministic=deterministic, rngs=rngs)
    return model, x_BTD, tokens_BT1[:, 1:], weights_BT


def chunked_ce(
    x_BTD: jax.Array,
    w_VD: jax.Array,
    targets_BT: jax.Array,
    weights_BT: jax.Array,
    *,
    valid_vocab: int,
    chunk: int = CHUNK_TOKENS,
    z_loss: float = 0.0,
    logit_cap: float = 0.0,
) -> jax.Array:
    """sum over (b, t) of weights * (logsumexp(logits) - logits[target] + z_loss * lse^2), where
    logits = x @ w.T (the tied head, as `GPT.logits`; w in the compute dtype, as
    `GPT.embedding_VD` gives it), ids >= valid_vocab masked.

    The sequence is cut into chunks of chunk // B positions (at least 1, at most T), each chunk
    every row's positions i*C..(i+1)*C-1, so that a chunk keeps the batch's sharding. Logits stay
    in x's dtype straight out of the matmul; logsumexp, the target logit and the loss are
    float32. logit_cap > 0 soft-caps the logits first, as `GPT.logits` does."""
    B, T, _ = x_BTD.shape
    C = max(1, min(T, chunk // B))
    stat = (valid_vocab, float(z_loss), float(logit_cap))
    return _ce_sum(stat, C, x_BTD, w_VD, targets_BT, weights_BT)


def _ce_and_probs(logits_BCV, tgt_BC, valid_vocab: int):
    """(cross-entropy, logsumexp) per position and the softmax [B, C, V], float32, padded ids at
    probability 0: each platform's fastest pass structure, chosen when the step is lowered (so a
    deviceless GPU compile gets the GPU program). Where only the loss is wanted, XLA drops the
    softmax. GPU: `_one_pass` statistics, then the softmax recomputed from logsumexp inside the
    gradient's fusion (no float32 [B, C, V] array is ever written). CPU: `_two_pass`, whose
    vectorised reductions and single exponential per logit run at the plain loss's speed where
    the one-pass reduction (scalar code on XLA:CPU, two exponentials per logit) was 1.35x slower."""
    return jax.lax.platform_dependent(
        logits_BCV,
        tgt_BC,
        cpu=functools.partial(_two_pass, valid_vocab=valid_vocab),
        default=functools.partial(_one_pass_softmax, valid_vocab=valid_vocab),
    )


def _two_pass(logits_BCV, tgt_BC, valid_vocab: int):
    ids_V = jnp.arange(logits_BCV.shape[-1])
    l_BCV = jnp.where(ids_V < valid_vocab, logits_BCV.astype(jnp.float32), MASKED_LOGIT)
    m_BC = jnp.max(l_BCV, axis=-1)
    e_BCV = jnp.exp(l_BCV - m_BC[..., None])  # exactly 0 at padded ids (MASKED_LOGIT)
    s_BC = jnp.sum(e_BCV, axis=-1)
    # A masked sum, not a gather: with the vocabulary split (tensor) each device sums its slice.
    t_BC = jnp.sum(jnp.where(ids_V == tgt_BC[..., None], l_BCV, 0.0), axis=-1)
    log_s_BC = jnp.log(s_BC)
    return log_s_BC - (t_BC - m_BC), m_BC + log_s_BC, e_BCV / s_BC[..., None]


def _one_pass_softmax(logits_BCV, tgt_BC, valid_vocab: int):
    ce_BC, lse_BC = _one_pass(logits_BCV, tgt_BC, valid_vocab)
    ids_V = jnp.arange(logits_BCV.shape[-1])
    p_BCV = jnp.exp(logits_BCV.astype(jnp.float32) - lse_BC[..., None])
    return ce_BC, lse_BC, jnp.where(ids_V < valid_vocab, p_BCV, 0.0)


def _one_pass(logits_BCV, tgt_BC, valid_vocab: int):
    """(cross-entropy, logsumexp) per position, float32, padded ids masked out, in one pass over
    the chunk's logits (max-then-sum would read them twice).

    The vocabulary is cut into K groups (64 where it divides V): a variadic reduction over each
    group carries (running max m, sum of exp(l - m), target logit), and the K partial triples
    combine with a plain max and sums. Split over the vocabulary (tensor), each device reduces its
    own groups and only [B, C] maxima and sums are all-reduced, as Megatron's vocabulary-parallel
    cross-entropy does; a custom reducer across devices would all-gather instead."""

    def combine(a, b):
        (m1, s1, t1), (m2, s2, t2) = a, b
        m = jnp.maximum(m1, m2)
        return m, s1 * jnp.exp(m1 - m) + s2 * jnp.exp(m2 - m), t1 + t2

    *BC, V = logits_BCV.shape
    K = math.gcd(V, VOCAB_GROUPS)
    ids_V = jnp.arange(V)
    l_BCV = logits_BCV.astype(jnp.float32)
    grouped = lambda a_BCV: a_BCV.reshape(*BC, K, V // K)
    lowest = jnp.float32(jnp.finfo(jnp.float32).min)
    m_BCK, s_BCK, t_BCK = jax.lax.reduce(
        (
            grouped(jnp.where(ids_V < valid_vocab, l_BCV, MASKED_LOGIT)),
            grouped(jnp.ones_like(l_BCV)),
            grouped(jnp.where(ids_V == tgt_BC[..., None], l_BCV, 0.0)),
        ),
        (lowest, jnp.float32(0), jnp.float32(0)),
        combine,
        (len(BC) + 1,),
    )
    m_BC = jnp.max(m_BCK, axis=-1)
    log_s_BC = jnp.log(jnp.sum(s_BCK * jnp.exp(m_BCK - m_BC[..., None]), axis=-1))
    t_BC = jnp.sum(t_BCK, axis=-1)
    # As optax writes it, log(sum exp(l - m)) - (l[target] - m): no large m added and taken away.
    return log_s_BC - (t_BC - m_BC), m_BC + log_s_BC


def _chunk_loss(ce_BC, lse_BC, wt_BC, z_loss: float):
    if z_loss:
        ce_BC = ce_BC + z_loss * lse_BC**2
    return jnp.sum(ce_BC * wt_BC)


def _for_chunks(body, init, C: int, x_BTD, w_VD, tgt_BT, wt_BT):
    """Runs body(carry, start, wc_VD, x_BCD, tgt_BC, wt_BC) over the chunks in order. The last
    chunk ends at T: where C does not divide T it overlaps its predecessor, and the overlap gets
    weight 0 there, so every position is scored once and nothing is padded or copied."""
    B, T, _ = x_BTD.shape
    n = -(-T // C)
    # The head's weights are cast to the compute dtype once, not once per chunk.
    wc_VD = w_VD.astype(x_BTD.dtype)
    wt_BT = wt_BT.astype(jnp.float32)

    def step(i, carry):
        start = jnp.minimum(i * C, T - C)
        sl = lambda a: jax.lax.dynamic_slice_in_dim(a, start, C, axis=1)
        fresh_C = start + jnp.arange(C) >= i * C
        x_BCD = constrain(sl(x_BTD), "BTD")
        return body(carry, start, wc_VD, x_BCD, sl(tgt_BT), sl(wt_BT) * fresh_C)

    return jax.lax.fori_loop(0, n, step, init)


def _head(x_BCD, w_VD, cap: float = 0.0):
    # bf16 operands with float32 accumulation give bf16 logits straight out of the matmul: no
    # float32 copy of a chunk is ever written. Rows split like the batch, the vocabulary like
    # wte's rows (tensor): vocabulary-parallel logits, as `GPT.logits` has them.
    return soft_cap(constrain(jnp.einsum("bcd,vd->bcv", x_BCD, w_VD), "BTV"), cap)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _ce_sum(stat, C, x_BTD, w_VD, tgt_BT, wt_BT):
    valid_vocab, z_loss, cap = stat

    def body(total, start, wc_VD, x_BCD, tgt_BC, wt_BC):
        ce_BC, lse_BC, _ = _ce_and_probs(_head(x_BCD, wc_VD, cap), tgt_BC, valid_vocab)
        return total + _chunk_loss(ce_BC, lse_BC, wt_BC, z_loss)

    return _for_chunks(body, jnp.zeros((), jnp.float32), C, x_BTD, w_VD, tgt_BT, wt_BT)


def _ce_sum_fwd(stat, C, x_BTD, w_VD, tgt_BT, wt_BT):
    valid_vocab, z_loss, cap = stat

    def body(carry, start, wc_VD, x_BCD, tgt_BC, wt_BC):
        total, dx_BTD, dw_VD = carry
        logits_BCV = _head(x_BCD, wc_VD, cap)
        ce_BC, lse_BC, p_BCV = _ce_and_probs(logits_BCV, tgt_BC, valid_vocab)
        total = total + _chunk_loss(ce_BC, lse_BC, wt_BC, z_loss)
        # d loss / d logits = weight * (softmax * (1 + 2 z lse) - onehot(target)); padded ids get
        # none of it, as their probability is exactly 0.
        ids_V = jnp.arange(logits_BCV.shape[-1])
        if z_loss:
            p_BCV = p_BCV * (1.0 + 2.0 * z_loss * lse_BC)[..., None]
        onehot_BCV = ids_V == tgt_BC[..., None]
        d_BCV = (p_BCV - onehot_BCV) * wt_BC[..., None]
        if cap:
            # Through the soft-cap: d(cap * tanh(l / cap)) / dl = 1 - (capped / cap)^2.
            d_BCV = d_BCV * (1.0 - jnp.square(logits_BCV.astype(jnp.float32) / cap))
        d_BCV = constrain(d_BCV.astype(x_BCD.dtype), "BTV")
        dx_BCD = jnp.einsum("bcv,vd->bcd", d_BCV, wc_VD)
        # Positions a previous chunk owns got weight 0 here, so adding leaves their gradient.
        C = x_BCD.shape[1]
        dx_BCD = dx_BCD + jax.lax.dynamic_slice_in_dim(dx_BTD, start, C, axis=1)
        dx_BTD = jax.lax.dynamic_update_slice_in_dim(dx_BTD, dx_BCD, start, axis=1)
        dw_VD = dw_VD + jnp.einsum("bcv,bcd->vd", d_BCV, x_BCD, preferred_element_type=jnp.float32)
        return total, dx_BTD, dw_VD

    init = (jnp.zeros((), jnp.float32), jnp.zeros_like(x_BTD), jnp.zeros(w_VD.shape, jnp.float32))
    total, dx_BTD, dw_VD = _for_chunks(body, init, C, x_BTD, w_VD, tgt_BT, wt_BT)
    return total, (dx_BTD, dw_VD.astype(w_VD.dtype))


def _ce_sum_bwd(stat, C, res, g):
    del stat, C
    dx_BTD, dw_VD = res
    # The saved gradients are those of the sum itself; the cotangent only scales them.
    return (g * dx_BTD).astype(dx_BTD.dtype), (g * dw_VD).astype(dw_VD.dtype), None, None


_ce_sum.defvjp(_ce_sum_fwd, _ce_sum_bwd)
