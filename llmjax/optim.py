"""The optimizer: global-norm clipping, then AdamW with decoupled weight decay, on a warmup+cosine
learning-rate schedule."""

from __future__ import annotations

import jax
import ml_collections
import optax


def lr_schedule(cfg: ml_collections.ConfigDict, steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr` over `warmup_steps`, then cosine to `min_lr` at `steps`."""
    warmup = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
    decay_steps = max(steps - cfg.warmup_steps, 1)
    # optax's cosine decays to alpha * init_value; alpha = min_lr / lr lands exactly on min_lr.
    cosine = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr / cfg.lr)
    return optax.join_schedules([warmup, cosine], [cfg.warmup_steps])


DECAYED = ("kernel", "embedding")


def decay_mask(params):
    """Weight decay applies to the weight matrices (linear kernels, embeddings), never to biases or
    LayerNorm scales, as in GPT-2 reproductions (nanoGPT, llm.c). Chosen by name, not by rank:
    c_attn's bias is stored [3, D] and must not be decayed."""
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key in DECAYED, params)


def make_optimizer(cfg: ml_collections.ConfigDict, steps: int) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity(),
        optax.adamw(
            lr_schedule(cfg, steps),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask,
        ),
    )
