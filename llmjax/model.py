"""GPT-2 as a Flax NNX module, with GPT-2's own names (wte, wpe, h, ln_1, attn.c_attn, ...).

Shapes: B batch, T time (query positions), S key positions, D model width (n_embd),
N heads, H head size, F MLP hidden size (4D), V padded vocabulary, L layers.

Weights carry logical axis names (vocab, embed, heads, mlp, ...), and so do the activations that
decide the layout (`constrain(x_BTD, "BTD")`: the residual stream (RESIDUAL), the norms' outputs,
q/k/v, the MLP's hidden units, logits) and each kernel as its matmul uses it (`_gathered`);
`sharding.py` maps all of them to mesh axes with one rules table. The model never sees a
mesh: outside sharding.activation_rules (one device, sampling, conversion, direct calls) the
constraints are no-ops.

With `scan_layers` the blocks are one Block whose every weight has a leading layer axis (logical
name "layers"), still stored under `h`, and the forward pass is one `lax.scan`: compile time and
program size stop growing with depth. `stack_layers` / `unstack_layers` convert parameter dicts
between the two layouts. `remat` recomputes each block's activations in the backward pass to save
memory.

Beside exact GPT-2 (the default, and all that convert exports) the config offers the changes of
the speedrun recipe (modded-nanogpt, nanochat): rotary positions, parameter-free RMSNorm, QK-norm,
ReLU^2, no biases, an untied zero-initialised head, zero-initialised output projections, a logit
soft-cap and the x0 shortcut. They keep GPT-2's module names where a module survives.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import PartitionSpec as P

from llmjax import tpu_attention
from llmjax.config import REMAT, VOCAB_SIZES, ConfigError

# A padded logit must never win a sample or take probability mass in the loss. A large finite value
# rather than -inf keeps every softmax and its gradient free of inf - inf.
MASKED_LOGIT = -1e9


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50304  # padded embedding rows (a multiple of 64 for fast matmuls)
    valid_vocab_size: int = 50257  # ids the tokenizer can produce; the rest is padding
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024  # longest context (rows of wpe)
    dropout: float = 0.0
    dtype: str = "float32"  # compute dtype of matmuls and activations
    param_dtype: str = "float32"  # storage dtype of the (master) weights
    attention: str = "xla"  # xla | cudnn (jax.nn.dot_product_attention) | splash (TPU Pallas)
    scan_layers: bool = False  # blocks stacked on a leading layer axis and run by one lax.scan
    remat: str = "none"  # per-block rematerialisation: none | dots_saveable | full (REMAT_POLICIES)
    # Architecture options (config.py documents each); the defaults are GPT-2.
    position: str = "learned"  # POSITIONS
    norm: str = "layernorm"  # NORMS
    qk_norm: bool = False
    mlp: str = "gelu"  # MLPS
    bias: bool = True
    tie_embeddings: bool = True
    zero_init_proj: bool = False
    logit_cap: float = 0.0
    x0_mix: bool = False


ROPE_BASE = 10000.0  # rotary frequencies base ** (-2i / H), as RoFormer and Llama
RMS_EPS = 1e-6
# Fields that change what the network computes (zero_init_proj only changes where it starts).
ARCH_FIELDS = ("position", "norm", "qk_norm", "mlp", "bias", "tie_embeddings", "logit_cap")
ARCH_FIELDS += ("x0_mix",)


def gpt2_departures(cfg: GPTConfig) -> list[str]:
    """The architecture options of `cfg` that differ from GPT-2's, as key=value strings."""
    default = GPTConfig()
    return [
        f"{f}={getattr(cfg, f)!r}" for f in ARCH_FIELDS if getattr(cfg, f) != getattr(default, f)
    ]


# What each block keeps for the backward pass; everything else is recomputed. "dots_saveable"
# keeps the weight matmuls' outputs (recomputing only cheap elementwise work and attention),
# "full" keeps only the block's input.
REMAT_POLICIES = {
    "none": None,
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}
assert tuple(REMAT_POLICIES) == REMAT  # the names config.py allows


# Shape letters -> the logical names of activation axes (mapped onto the mesh by sharding.RULES).
# H (the size of one head) is never split.
ACTIVATION_AXES = {
    "B": "activation_batch",
    "T": "activation_length",
    "S": "activation_length",
    "D": "activation_embed",
    "N": "activation_heads",
    "H": None,
    "F": "activation_mlp",
    "V": "activation_vocab",
}


# The residual stream, from each block's input through its norms to its output projections'
# sums: [B, T, D] with its rows named apart from the "BTD" where attention and the MLP work, so
# that tensor parallelism can split it too (sharding.RULES: Megatron's sequence parallelism).
RESIDUAL = ("activation_residual_batch", "activation_length", "activation_embed")


def _all_rows(x_BTD: jax.Array) -> jax.Array:
    """A norm's output, computed on this device's rows of the residual stream, gathered to every
    row of its data replica for the tensor-parallel projections. Pinning both layouts makes XLA
    gather this compute-dtype output rather than the norm's float32 intermediate."""
    return constrain(constrain(x_BTD, RESIDUAL), "BTD")


def constrain(x: jax.Array, axes: str | tuple[str | None, ...]) -> jax.Array:
    """`x` with its axes named for the SPMD partitioner: an activation by shape letters (`"BTD"`,
    `"BTNH"`, ...; ACTIVATION_AXES), or any array by logical names (`("vocab", "embed")`).

    Where the names land is sharding.py's decision, in force only inside its `activation_rules`
    context (the jitted train and eval steps). Outside it, or on a single device, `x` itself.
    """
    rules = dict(flax_spmd.get_logical_axis_rules())
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh.empty or mesh.size == 1:
        return x
    if len(axes) != x.ndim:
        raise ValueError(f"axes {axes!r} name {len(axes)} dimensions of a {x.ndim}-d array")
    names = [ACTIVATION_AXES[a] for a in axes] if isinstance(axes, str) else axes
    return jax.lax.with_sharding_constraint(x, P(*(rules[n] if n else None for n in names)))


def pad_vocab(n: int, multiple: int = 64) -> int:
    return -(-n // multiple) * multiple


def model_config(cfg, backend: str = "cpu") -> GPTConfig:
    """The model's own frozen config, from a run config's `model` keys: vocabulary from the
    tokenizer's (config.VOCAB_SIZES), attention from the backend."""
    m = cfg.model
    vocab = VOCAB_SIZES[cfg.data.tokenizer]
    attention = m.attention
    if attention == "auto":
        # cuDNN's fused attention needs a GPU and half precision; splash a TPU; XLA's runs
        # everywhere.
        attention = "cudnn" if backend == "gpu" and m.dtype != "float32" else "xla"
        attention = "splash" if backend == "tpu" else attention
    if attention == "splash" and backend != "tpu":
        raise ConfigError(f"model.attention=splash is a TPU kernel; this backend is {backend}")
    return GPTConfig(
        vocab_size=m.vocab_size or pad_vocab(vocab),
        valid_vocab_size=vocab,
        n_layer=m.n_layer,
        n_head=m.n_head,
        n_embd=m.n_embd,
        block_size=m.block_size,
        dropout=m.dropout,
        dtype=m.dtype,
        param_dtype=m.param_dtype,
        attention=attention,
        scan_layers=m.scan_layers,
        remat=m.remat,
        position=m.position,
        norm=m.norm,
        qk_norm=m.qk_norm,
        mlp=m.mlp,
        bias=m.bias,
        tie_embeddings=m.tie_embeddings,
        zero_init_proj=m.zero_init_proj,
        logit_cap=m.logit_cap,
        x0_mix=m.x0_mix,
    )


def _init(std: float, names: tuple[str | None, ...]):
    return nnx.with_partitioning(nnx.initializers.normal(std), names, eager_sharding=False)


def _zeros(names: tuple[str | None, ...]):
    return nnx.with_partitioning(nnx.initializers.zeros_init(), names, eager_sharding=False)


def _ones(names: tuple[str | None, ...]):
    return nnx.with_partitioning(nnx.initializers.ones_init(), names, eager_sharding=False)


def rms_norm(x: jax.Array, eps: float = RMS_EPS) -> jax.Array:
    """x / rms(x) over the last axis, computed in float32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm without a learned scale: the next layer's weights can absorb one."""

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        return rms_norm(x_BTD)


def rotary(x_BTNH: jax.Array, pos_T: jax.Array) -> jax.Array:
    """Rotary position embedding: the pairs (x[i], x[i + H/2]) of each head turned by the angle
    pos * ROPE_BASE ** (-2i / H) (the split-halves layout of GPT-NeoX and Llama). Angles in
    float32, so long positions keep their precision in bf16."""
    H = x_BTNH.shape[-1]
    inv_freq_h = ROPE_BASE ** (-jnp.arange(0, H // 2, dtype=jnp.float32) / (H // 2))
    angle_Th = pos_T.astype(jnp.float32)[:, None] * inv_freq_h[None, :]
    cos_T1h, sin_T1h = jnp.cos(angle_Th)[:, None, :], jnp.sin(angle_Th)[:, None, :]
    x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
    y = jnp.concatenate([x1 * cos_T1h - x2 * sin_T1h, x1 * sin_T1h + x2 * cos_T1h], axis=-1)
    return y.astype(x_BTNH.dtype)


def _norm(cfg: GPTConfig, rngs: nnx.Rngs) -> nnx.Module:
    return RMSNorm() if cfg.norm == "rmsnorm" else _layer_norm(cfg, rngs)


def _layer_norm(cfg: GPTConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # GPT-2 uses epsilon 1e-5 (flax's default is 1e-6).
    return nnx.LayerNorm(
        cfg.n_embd,
        epsilon=1e-5,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        scale_init=_ones(("embed",)),
        bias_init=_zeros(("embed",)),
        rngs=rngs,
    )


def _as_used(w: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """A weight, already cast to the compute dtype, as its matmul or lookup uses it: named with
    the activation axes it meets (sharding.RULES), so fsdp's shard is all-gathered right before
    use (ZeRO-3) and tensor's split stays. Named as stored first, so that the cast happens where
    the shards live and the gather moves the compute dtype: otherwise XLA gathers the float32
    master weights."""
    return constrain(constrain(w, names), tuple(n and f"activation_{n}" for n in names))


@functools.cache  # one function per layout: equal configs give equal graphdefs (no recompiles)
def _gathered(names: tuple[str | None, ...]):
    """A layer's dtype promotion that also puts its kernel `_as_used`.

    Left to itself XLA picks the cheaper-looking layout per matmul, and under fsdp and tensor
    together it formed c_proj's output by all-gathering every fsdp rank's hidden activations (the
    global batch's rows: 12.07 GB peak instead of 6.52 for 124M on fsdp=4, tensor=2;
    benchmarks/NOTES.md) instead of the kernel."""

    def promote(arrays, /, *, dtype=None, inexact=True):
        x, kernel, bias = nnx.nn.dtypes.promote_dtype(arrays, dtype=dtype, inexact=inexact)
        return x, _as_used(kernel, names), bias

    return promote


def _linear(
    cfg: GPTConfig, d_in: int, d_out: int, std: float, names, rngs, dot_general=jax.lax.dot_general
) -> nnx.Linear:
    return nnx.Linear(
        d_in,
        d_out,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        kernel_init=_zeros(names) if std == 0 else _init(std, names),
        bias_init=_zeros(names[1:]),
        use_bias=cfg.bias,
        promote_dtype=_gathered(names),
        dot_general=dot_general,
        rngs=rngs,
    )


def _input_first_dot(x, kernel, dimension_numbers, precision=None, **kwargs):
    """`lax.dot_general` for a widening layer (c_fc), whose kernel gradient on CPU is formed as
    x^T g rather than JAX's (g^T x)^T (`_input_first_matmul`). The platform is chosen here, at
    the forward product, not in its gradient: lowered for one platform, the switch keeps one
    branch, so every other platform differentiates the plain lax.dot_general itself and gets
    JAX's own program by construction, not because XLA happens to compile a custom_vjp's
    JAX-ordered backward the same. Anything beyond the plain [..., D] x [D, F] product of
    nnx.Linear goes to lax.dot_general itself."""
    contracting = (((x.ndim - 1,), (0,)), ((), ()))
    if precision is not None or any(v is not None for v in kwargs.values()):
        return jax.lax.dot_general(x, kernel, dimension_numbers, precision, **kwargs)
    if dimension_numbers != contracting:
        return jax.lax.dot_general(x, kernel, dimension_numbers)
    jax_own = lambda x, w: jax.lax.dot_general(x, w, contracting)
    return jax.lax.platform_dependent(x, kernel, cpu=_input_first_matmul, default=jax_own)


@jax.custom_vjp
def _input_first_matmul(x_BTD: jax.Array, w_DF: jax.Array) -> jax.Array:
    """x @ w whose kernel gradient is formed as x^T g (CPU only: `_input_first_dot`).

    JAX's transpose of a matmul forms the kernel gradient as (g^T x)^T, the output gradient g as
    the left operand. XLA:CPU then lays g [B*T, F] out transposed for its matmul and fuses the
    producer of g (GELU's gradient) into that transposing write, a loop that does not vectorise:
    a fifth of the nanoGPT recipe's step (benchmarks/NOTES.md). As x^T g, XLA transposes x
    [B*T, D] instead, 4x smaller for c_fc and already in memory."""
    return jax.lax.dot_general(x_BTD, w_DF, (((x_BTD.ndim - 1,), (0,)), ((), ())))


def _input_first_fwd(x_BTD, w_DF):
    return _input_first_matmul(x_BTD, w_DF), (x_BTD, w_DF)


def _input_first_bwd(res, g_BTF):
    x_BTD, w_DF = res
    lead = tuple(range(x_BTD.ndim - 1))
    dw_DF = jax.lax.dot_general(x_BTD, g_BTF, ((lead, lead), ((), ())))
    dx_BTD = jax.lax.dot_general(g_BTF, w_DF, (((g_BTF.ndim - 1,), (1,)), ((), ())))
    return dx_BTD, dw_DF.astype(w_DF.dtype)


_input_first_matmul.defvjp(_input_first_fwd, _input_first_bwd)


def _proj_std(cfg: GPTConfig, std: float) -> float:
    # GPT-2 scales the init of projections into the residual stream by 1/sqrt(2 * n_layer); the
    # speedrun starts them at zero, so that every block starts as the identity.
    return 0.0 if cfg.zero_init_proj else std / math.sqrt(2 * cfg.n_layer)


class CausalSelfAttention(nnx.Module):
    def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
        D, std = cfg.n_embd, 0.02
        self.n_head, self.attention = cfg.n_head, cfg.attention
        self.rope, self.qk_norm = cfg.position == "rope", cfg.qk_norm
        # c_attn is GPT-2's [D, 3D] projection stored as [D, 3, D] so that a tensor-parallel split
        # of the last axis keeps whole heads together (the flat 3D axis would split q from k and v).
        names = ("embed", None, "heads")
        self.c_attn = nnx.Einsum(
            "btd,dkf->btkf",
            (D, 3, D),
            (3, D) if cfg.bias else None,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            kernel_init=_init(std, names),
            bias_init=_zeros(names[1:]),
            promote_dtype=_gathered(names),
            rngs=rngs,
        )
        self.c_proj = _linear(cfg, D, D, _proj_std(cfg, std), ("heads", "embed"), rngs)
        self.resid_dropout = nnx.Dropout(cfg.dropout)

    def __call__(self, x_BTD, *, cache=None, pos=None, deterministic: bool = True, rngs=None):
        B, T, D = x_BTD.shape
        N = self.n_head
        qkv_BTKD = self.c_attn(x_BTD)
        q_BTNH, k_BTNH, v_BTNH = (
            constrain(qkv_BTKD[:, :, i].reshape(B, T, N, D // N), "BTNH") for i in range(3)
        )
        if self.qk_norm:
            q_BTNH, k_BTNH = rms_norm(q_BTNH), rms_norm(k_BTNH)
        if self.rope:
            # Keys enter the cache already rotated: a decode step rotates only its own positions.
            pos_T = (0 if pos is None else pos) + jnp.arange(T)
            q_BTNH, k_BTNH = rotary(q_BTNH, pos_T), rotary(k_BTNH, pos_T)
        if cache is None:
            # Attention-probability dropout is left out: fused kernels (cuDNN flash) do not offer
            # it, and GPT-2 pretraining runs with dropout 0.
            if self.attention == "splash":  # Pallas TPU kernel, per device (tpu_attention.py)
                y_BTNH = tpu_attention.causal_attention(q_BTNH, k_BTNH, v_BTNH)
            else:
                y_BTNH = jax.nn.dot_product_attention(
                    q_BTNH, k_BTNH, v_BTNH, is_causal=True, implementation=self.attention
                )
        else:
            # Decoding: write this chunk's keys/values at `pos`, attend over the whole cache with a
            # mask, so every step has the same shapes and nothing recompiles.
            k_BSNH = jax.lax.dynamic_update_slice(
                cache[0], k_BTNH.astype(cache[0].dtype), (0, pos, 0, 0)
            )
            v_BSNH = jax.lax.dynamic_update_slice(
                cache[1], v_BTNH.astype(cache[1].dtype), (0, pos, 0, 0)
            )
            S = k_BSNH.shape[1]
            mask_TS = jnp.arange(S)[None, :] <= (pos + jnp.arange(T))[:, None]
            y_BTNH = jax.nn.dot_product_attention(
                q_BTNH,
                k_BSNH.astype(q_BTNH.dtype),
                v_BSNH.astype(q_BTNH.dtype),
                mask=mask_TS[None, None],
                implementation="xla",
            )
            cache = (k_BSNH, v_BSNH)
        y_BTNH = constrain(y_BTNH, "BTNH")
        y_BTD = constrain(self.c_proj(y_BTNH.reshape(B, T, D)), RESIDUAL)
        return self.resid_dropout(y_BTD, deterministic=deterministic, rngs=rngs), cache


# GPT-2's tanh-approximated GELU, recomputed in the backward pass from its input: otherwise XLA
# keeps its output and the tanh inside it, two more [B, T, 4D] buffers per layer (2.4 GB of the
# 124M step's peak at batch 16 x 1024 on an H100), for a recompute of one elementwise pass.
_gelu = jax.checkpoint(functools.partial(jax.nn.gelu, approximate=True))


class MLP(nnx.Module):
    def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
        D, std = cfg.n_embd, 0.02
        self.relu2 = cfg.mlp == "relu2"
        # A remat policy sees no matmul inside a custom_vjp (dots_saveable would recompute
        # c_fc): under remat, c_fc keeps JAX's own matmul.
        dot = _input_first_dot if cfg.remat == "none" else jax.lax.dot_general
        self.c_fc = _linear(cfg, D, 4 * D, std, ("embed", "mlp"), rngs, dot)
        self.c_proj = _linear(cfg, 4 * D, D, _proj_std(cfg, std), ("mlp", "embed"), rngs)
        self.dropout = nnx.Dropout(cfg.dropout)

    def __call__(self, x_BTD, *, deterministic: bool = True, rngs=None):
        h_BTF = constrain(self.c_fc(x_BTD), "BTF")
        if self.relu2:
            h_BTF = jnp.square(jax.nn.relu(h_BTF))  # Primer's ReLU^2, as modded-nanogpt
        else:
            h_BTF = _gelu(h_BTF)
        y_BTD = constrain(self.c_proj(h_BTF), RESIDUAL)
        return self.dropout(y_BTD, deterministic=deterministic, rngs=rngs)


class Block(nnx.Module):
    def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
        # Pre-LayerNorm: GPT-2 normalises the input of each sub-block, not its output.
        self.ln_1 = _norm(cfg, rngs)
        self.attn = CausalSelfAttention(cfg, rngs)
        self.ln_2 = _norm(cfg, rngs)
        self.mlp = MLP(cfg, rngs)
        if cfg.x0_mix:
            # (a, b) of x <- a * x + b * x0, starting at the plain residual stream (1, 0).
            init = lambda key, shape, dtype: jnp.array([1.0, 0.0], dtype)
            self.x0_lambdas = nnx.Param(
                nnx.with_partitioning(init, (None,), eager_sharding=False)(
                    rngs.params(), (2,), cfg.param_dtype
                )
            )

    def __call__(
        self, x_BTD, x0_BTD=None, *, cache=None, pos=None, deterministic: bool = True, rngs=None
    ):
        # Pinning the residual stream's rows here is what makes fsdp gather weights rather than
        # activations: each device keeps its own rows through every layer (and under tensor
        # parallelism, its share of its replica's rows between the projections).
        x_BTD = constrain(x_BTD, RESIDUAL)
        if x0_BTD is not None:
            # modded-nanogpt's x0 shortcut: every block can read the embedding directly.
            a, b = self.x0_lambdas[...].astype(x_BTD.dtype)
            x_BTD = a * x_BTD + b * x0_BTD
        a_BTD, cache = self.attn(
            _all_rows(self.ln_1(x_BTD)),
            cache=cache,
            pos=pos,
            deterministic=deterministic,
            rngs=rngs,
        )
        x_BTD = x_BTD + a_BTD
        x_BTD = x_BTD + self.mlp(
            _all_rows(self.ln_2(x_BTD)), deterministic=deterministic, rngs=rngs
        )
        return constrain(x_BTD, RESIDUAL), cache


class GPT(nnx.Module):
    def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        embed = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.wte = nnx.Embed(
            cfg.vocab_size, cfg.n_embd, embedding_init=_init(0.02, ("vocab", "embed")), **embed
        )
        if cfg.position == "learned":
            self.wpe = nnx.Embed(
                cfg.block_size, cfg.n_embd, embedding_init=_init(0.02, (None, "embed")), **embed
            )
        self.drop = nnx.Dropout(cfg.dropout)
        if cfg.scan_layers:
            self.h = _stacked_blocks(cfg, rngs)
        else:
            self.h = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layer)])
        self.ln_f = _norm(cfg, rngs)
        if not cfg.tie_embeddings:
            # modded-nanogpt's untied head starts at zero: the first logits are uniform.
            self.lm_head = nnx.Embed(
                cfg.vocab_size, cfg.n_embd, embedding_init=_zeros(("vocab", "embed")), **embed
            )

    def __call__(self, idx_BT, *, deterministic: bool = True, rngs=None):
        """Returns float32 logits [B, T, V] with padded ids masked out."""
        return self.logits(self.hidden(idx_BT, deterministic=deterministic, rngs=rngs))

    def hidden(self, idx_BT, *, deterministic: bool = True, rngs=None):
        """The final hidden states [B, T, D] (after ln_f): what the LM head reads. The training
        loss takes these, so that it can apply the head chunk by chunk (see loss.py)."""
        return self._forward(idx_BT, None, 0, deterministic, rngs)[0]

    def logits(self, x_BTD):
        """The LM head: float32 logits [..., V] of hidden states, padded ids masked out."""
        # Tied embedding: the output projection is wte itself (GPT-2 shares them). Rows stay split
        # like the batch and the vocabulary like wte's rows (tensor): vocabulary-parallel logits.
        axes = "V" if x_BTD.ndim == 1 else "B" + "T" * (x_BTD.ndim - 2) + "V"
        x_BTD = constrain(x_BTD.astype(self.cfg.dtype), axes[:-1] + "D")
        logits_BTV = constrain(jnp.dot(x_BTD, self.head_VD().T), axes)
        logits_BTV = soft_cap(logits_BTV.astype(jnp.float32), self.cfg.logit_cap)
        valid_V = jnp.arange(self.cfg.vocab_size) < self.cfg.valid_vocab_size
        return jnp.where(valid_V, logits_BTV, MASKED_LOGIT)

    def embedding_VD(self) -> jax.Array:
        """wte as the lookup and the LM head use it: in the compute dtype, named like an activation
        (split over the vocabulary only). Under fsdp that all-gathers the table once, in bf16, and
        each device looks up and projects its own rows; left to itself XLA splits the lookup by
        width instead and moves every device's rows to every other (all-to-alls of the batch)."""
        return _as_used(self.wte.embedding[...].astype(self.cfg.dtype), ("vocab", "embed"))

    def head_VD(self) -> jax.Array:
        """The LM head's [V, D] matrix as `GPT.logits` and the loss use it: wte itself when tied
        (GPT-2), else lm_head; in the compute dtype, named like `embedding_VD`."""
        if self.cfg.tie_embeddings:
            return self.embedding_VD()
        return _as_used(self.lm_head.embedding[...].astype(self.cfg.dtype), ("vocab", "embed"))

    def decode(self, idx_BT, cache: list, pos):
        """Runs `idx_BT` at positions pos..pos+T-1 against a KV cache (see `init_cache`)."""
        x_BTD, cache = self._forward(idx_BT, cache, pos, True, None)
        return self.logits(x_BTD), cache

    def init_cache(self, batch: int, max_len: int) -> list | tuple:
        """Per-layer (k, v) pairs; with scan_layers one (k_LBSNH, v_LBSNH) pair stacked by layer."""
        H = self.cfg.n_embd // self.cfg.n_head
        shape = (batch, max_len, self.cfg.n_head, H)
        if self.cfg.scan_layers:
            shape = (self.cfg.n_layer, *shape)
            return (jnp.zeros(shape, self.cfg.dtype), jnp.zeros(shape, self.cfg.dtype))
        return [
            (jnp.zeros(shape, self.cfg.dtype), jnp.zeros(shape, self.cfg.dtype))
            for _ in range(self.cfg.n_layer)
        ]

    def _forward(self, idx_BT, cache, pos, deterministic, rngs):
        T = idx_BT.shape[1]
        # The ids whole on every tensor rank, as the loss reads its targets: split like the
        # residual stream's rows, every loss chunk would gather its own.
        idx_BT = constrain(idx_BT, "BT")
        x_BTD = jnp.take(self.embedding_VD(), idx_BT, axis=0)
        if self.cfg.position == "learned":
            x_BTD = x_BTD + self.wpe(pos + jnp.arange(T))[None]
        x_BTD = constrain(self.drop(x_BTD, deterministic=deterministic, rngs=rngs), RESIDUAL)
        x0_BTD = x_BTD if self.cfg.x0_mix else None
        # One dropout key per layer, so scanned and unrolled layers draw the same masks.
        keys_L = None if rngs is None else jax.random.split(rngs.dropout(), self.cfg.n_layer)
        run = functools.partial(_run_block, deterministic=deterministic)
        if self.cfg.remat != "none":
            run = jax.checkpoint(run, policy=REMAT_POLICIES[self.cfg.remat], static_argnums=0)
        if self.cfg.scan_layers:
            graphdef, params_L = nnx.split(self.h)

            def layer(x_BTD, xs):
                params, layer_cache, key = xs
                return run(graphdef, params, x_BTD, x0_BTD, layer_cache, pos, key)

            x_BTD, new_cache = jax.lax.scan(layer, x_BTD, (params_L, cache, keys_L))
        else:
            new_cache = []
            for i, block in enumerate(self.h):
                graphdef, params = nnx.split(block)
                x_BTD, c = run(
                    graphdef,
                    params,
                    x_BTD,
                    x0_BTD,
                    None if cache is None else cache[i],
                    pos,
                    None if keys_L is None else keys_L[i],
                )
                new_cache.append(c)
        return _all_rows(self.ln_f(x_BTD)), (None if cache is None else new_cache)


def _stacked_blocks(cfg: GPTConfig, rngs: nnx.Rngs) -> Block:
    """n_layer Blocks as one, every weight with a leading "layers" axis (its own init per layer)."""

    @nnx.split_rngs(splits=cfg.n_layer)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs: nnx.Rngs) -> Block:
        return Block(cfg, rngs)

    return make(rngs)


def _run_block(graphdef, params, x_BTD, x0_BTD, cache, pos, key, *, deterministic: bool):
    # A pure function of arrays, so that jax.checkpoint and lax.scan can wrap it.
    block = nnx.merge(graphdef, params)
    rngs = None if key is None else nnx.Rngs(dropout=key)
    return block(x_BTD, x0_BTD, cache=cache, pos=pos, deterministic=deterministic, rngs=rngs)


def soft_cap(logits: jax.Array, cap: float) -> jax.Array:
    """cap * tanh(logits / cap) (Gemma 2, modded-nanogpt): logits within (-cap, cap); 0 = off."""
    return cap * jnp.tanh(logits / cap) if cap else logits


def _stack(xs):
    return np.stack(xs) if isinstance(xs[0], np.ndarray) else jnp.stack(xs)


def stack_layers(params: dict) -> dict:
    """Unscanned params pure dict ({"h": {0: {...}, 1: {...}}, ...}) -> scanned layout (every leaf
    under "h" stacked on a leading layer axis). Other entries are shared, not copied."""
    h = params["h"]
    layers = [h[k] for k in sorted(h, key=int)]
    return {**params, "h": jax.tree.map(lambda *xs: _stack(xs), *layers)}


def unstack_layers(params: dict) -> dict:
    """The inverse of `stack_layers`: scanned params pure dict -> {"h": {0: {...}, 1: ...}}."""
    h = params["h"]
    n_layer = jax.tree.leaves(h)[0].shape[0]
    return {**params, "h": {i: jax.tree.map(lambda a, i=i: a[i], h) for i in range(n_layer)}}


def count_params(model: GPT, *, padding: bool = True) -> int:
    """Parameter count; without padding the unused wte rows are left out (124M: 124,439,808)."""
    n = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    if not padding:
        n -= (model.cfg.vocab_size - model.cfg.valid_vocab_size) * model.cfg.n_embd
    return n


def flops_per_token(cfg: GPTConfig, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token as llm.c counts them: 6N + 6*L*D*T.

    6N: forward (2N) plus backward (4N) matmul FLOPs; 6*L*D*T: attention scores and values, halved
    for the causal mask. N includes the padded embedding rows, as in llm.c. With an untied head
    (tie_embeddings=False) the input table wte is a lookup, not a matmul: its V x D are left out
    of N, and the head's, which are a matmul, stay.
    """
    matmul_params = n_params - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.n_embd)
    return 6.0 * matmul_params + 6.0 * cfg.n_layer * cfg.n_embd * seq_len
