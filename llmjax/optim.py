"""The optimizer: global-norm clipping, then AdamW with decoupled weight decay (`optim.name=adamw`)
or Muon for the blocks' weight matrices and AdamW for everything else (`optim.name=muon`), on a
warmup+cosine or warmup/stable/decay learning-rate schedule."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import optax
from optax.contrib import MuonDimensionNumbers

NS_STEPS = 5  # Newton-Schulz iterations per Muon update (optax's default, Keller Jordan's)


def lr_schedule(
    cfg: ml_collections.ConfigDict, steps: int, peak: float | None = None
) -> optax.Schedule:
    """Linear warmup from 0 to `peak` (default `cfg.lr`) over `warmup_steps`, then either cosine to
    the same fraction min_lr / lr of it at `steps` (schedule=cosine), or held at the peak and
    decayed linearly to that fraction over the last `decay_frac` of the steps (schedule=wsd: the
    trapezoid of modded-nanogpt and nanochat, which lets a run stop or go on at any stable step)."""
    peak = cfg.lr if peak is None else peak
    floor = peak * cfg.min_lr / cfg.lr
    warmup = optax.linear_schedule(0.0, peak, cfg.warmup_steps)
    if cfg.schedule == "wsd":
        decay_steps = min(max(round(steps * cfg.decay_frac), 1), max(steps - cfg.warmup_steps, 1))
        stable_end = steps - decay_steps
        stable = optax.constant_schedule(peak)
        decay = optax.linear_schedule(peak, floor, decay_steps)
        return optax.join_schedules([warmup, stable, decay], [cfg.warmup_steps, stable_end])
    decay_steps = max(steps - cfg.warmup_steps, 1)
    # optax's cosine decays to alpha * init_value; alpha = min_lr / lr lands exactly on min_lr.
    cosine = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.min_lr / cfg.lr)
    return optax.join_schedules([warmup, cosine], [cfg.warmup_steps])


DECAYED = ("kernel", "embedding")


def decay_mask(params):
    """Weight decay applies to the weight matrices (linear kernels, embeddings), never to biases or
    LayerNorm scales, as in GPT-2 reproductions (nanoGPT, llm.c). Chosen by name, not by rank:
    c_attn's bias is stored [3, D] and must not be decayed."""
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key in DECAYED, params)


def muon_dimension_numbers(params):
    """For each parameter, how Muon sees it as matrices (MuonDimensionNumbers), or None where AdamW
    takes it. Muon takes the blocks' weight kernels only; embeddings, the head, norms, biases and
    scalars stay with AdamW (the Muon paper's split: they are not maps between hidden spaces).

    c_attn's kernel [D, 3, D] is three matrices, q, k and v, each orthogonalised on its own: the
    middle axis is a batch axis. With scan_layers every kernel has a leading layer axis, also a
    batch axis, so each layer is orthogonalised on its own as it is unrolled."""

    def spec(path, x):
        keys = [getattr(k, "key", None) for k in path]
        if keys[0] != "h" or keys[-1] != "kernel":
            return None
        # Unrolled blocks sit under h/<int>/...; stacked ones have the layer axis in front.
        lead = x.ndim - (3 if keys[-2] == "c_attn" else 2)
        return MuonDimensionNumbers(reduction_axis=lead, output_axis=x.ndim - 1)

    return jax.tree_util.tree_map_with_path(spec, params)


def muon_labels(params):
    """The label, muon or adamw, of each parameter (see `muon_dimension_numbers`)."""
    specs = muon_dimension_numbers(params)
    return jax.tree.map(
        lambda s, _: "adamw" if s is None else "muon",
        specs,
        params,
        is_leaf=_is_spec,
    )


def muon_momentum(cfg: ml_collections.ConfigDict) -> optax.Schedule:
    """Muon's momentum: from muon_momentum_start up to muon_momentum over the first
    muon_momentum_warmup steps (modded-nanogpt's warm-up: early gradients change fast, so early
    momentum averages fewer of them), then constant."""
    if cfg.muon_momentum_warmup == 0:
        return optax.constant_schedule(cfg.muon_momentum)
    return optax.linear_schedule(
        cfg.muon_momentum_start, cfg.muon_momentum, cfg.muon_momentum_warmup
    )


def _adamw(cfg: ml_collections.ConfigDict, steps: int) -> optax.GradientTransformation:
    return optax.adamw(
        lr_schedule(cfg, steps),
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=decay_mask,
    )


def _empty_like(x):
    # Stands in for a parameter a branch does not own: no memory, and a rank (at least 2, as
    # Muon's reshapes need; never below the parameter's) that the parameter's sharding still fits.
    return jnp.zeros((0,) * max(x.ndim, 2), x.dtype)


def _split(transforms: dict, labels_fn) -> optax.GradientTransformation:
    """optax.partition, with every branch's state shaped like the whole parameter tree.

    optax.partition masks the parameters a branch does not own with optax's MaskedNode, and then
    `optax.tree_map_params` (how train.build shards the optimizer state like the parameters) no
    longer recognises its moments. Here a branch sees every parameter, those it does not own as
    zero-size arrays: its moments are full trees again, sharded leaf by leaf like the parameters
    (a zero-size leaf fits any sharding), and cost nothing where unused."""

    def own(tree, labels, label):
        return jax.tree.map(lambda x, lab: x if lab == label else _empty_like(x), tree, labels)

    def init(params):
        if not jax.tree.leaves(params):
            # tree_map_params's placeholder: it marks where copies of the parameter tree live.
            return {k: tx.init(params) for k, tx in transforms.items()}
        labels = labels_fn(params)
        return {k: tx.init(own(params, labels, k)) for k, tx in transforms.items()}

    def update(updates, state, params=None):
        labels = labels_fn(updates)
        new_state, branch = {}, {}
        for k, tx in transforms.items():
            p = None if params is None else own(params, labels, k)
            branch[k], new_state[k] = tx.update(own(updates, labels, k), state[k], p)
        leaves = {k: jax.tree.leaves(u) for k, u in branch.items()}
        flat, treedef = jax.tree.flatten(labels)
        return treedef.unflatten(leaves[lab][i] for i, lab in enumerate(flat)), new_state

    return optax.GradientTransformation(init, update)


def _shape_scale() -> optax.GradientTransformation:
    """Muon's update of a [fan_in, fan_out] matrix times sqrt(max(1, fan_out / fan_in)): unit
    spectral norm scaled so that wide outputs (c_fc) move as much per unit as square ones (Keller
    Jordan's Muon, and optax's default)."""

    def scale(u, spec):
        fan_in, fan_out = u.shape[spec.reduction_axis], u.shape[spec.output_axis]
        return u * math.sqrt(max(1.0, fan_out / max(fan_in, 1)))

    def update(updates, state, params=None):
        del params
        specs = _muon_specs(updates)
        return jax.tree.map(scale, updates, specs, is_leaf=_is_spec), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def _muon_specs(tree):
    # Every leaf a Muon branch sees: the real matrices' specs, and any stand-in's (see _split).
    specs = muon_dimension_numbers(tree)
    return jax.tree.map(
        lambda s, x: MuonDimensionNumbers(x.ndim - 2, x.ndim - 1) if s is None else s,
        specs,
        tree,
        is_leaf=_is_spec,
    )


def _is_spec(s) -> bool:
    return s is None or isinstance(s, MuonDimensionNumbers)


def _muon(cfg: ml_collections.ConfigDict, steps: int) -> optax.GradientTransformation:
    # optax's Muon core (momentum, Newton-Schulz with batch axes per MuonDimensionNumbers) on the
    # matrices; inject_hyperparams evaluates the momentum schedule each step. optax.contrib.muon
    # itself would bring its own optax.partition (see _split) and an AdamW branch that decays
    # biases and norms; ours keeps the decay mask and its own betas.
    momentum = optax.inject_hyperparams(
        optax.contrib.scale_by_muon,
        static_args=("weight_dimension_numbers", "ns_steps", "nesterov"),
    )(
        beta=muon_momentum(cfg),
        ns_steps=NS_STEPS,
        nesterov=True,
        weight_dimension_numbers=_muon_specs,
    )
    matrices = optax.chain(
        momentum,
        _shape_scale(),
        optax.add_decayed_weights(cfg.muon_weight_decay),
        optax.scale_by_learning_rate(lr_schedule(cfg, steps, peak=cfg.muon_lr)),
    )
    return _split({"muon": matrices, "adamw": _adamw(cfg, steps)}, muon_labels)


def make_optimizer(cfg: ml_collections.ConfigDict, steps: int) -> optax.GradientTransformation:
    inner = _muon(cfg, steps) if cfg.name == "muon" else _adamw(cfg, steps)
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity(),
        inner,
    )


def newton_schulz_flops(params) -> float:
    """Matmul FLOPs of one Muon step's Newton-Schulz iterations (NS_STEPS quintic steps on each
    matrix m x n, m <= n: X X^T costs 2 m^2 n, (bA + cA^2) 2 m^3, times X 2 m^2 n)."""
    total = 0.0
    specs = jax.tree.leaves(muon_dimension_numbers(params), is_leaf=_is_spec)
    for x, s in zip(jax.tree.leaves(params), specs, strict=True):
        if s is None:
            continue
        rows, cols = x.shape[s.reduction_axis], x.shape[s.output_axis]
        m, n = min(rows, cols), max(rows, cols)
        total += NS_STEPS * (4 * m * m * n + 2 * m**3) * (x.size // (rows * cols))
    return total
