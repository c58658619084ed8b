"""Causal attention on TPU: Pallas splash attention (jax.experimental.pallas.ops.tpu), per device.

Splash attention is a flash-attention kernel for the TPU's MXU that skips the blocks a causal mask
hides (half the score FLOPs). A Pallas kernel is a custom call the SPMD partitioner cannot split,
so it runs under `shard_map`, each device on its own rows of the batch (the mesh axes of
`activation_batch`) and its own heads (`activation_heads`), the layout the model already gives
q, k and v; with one device or outside sharding.activation_rules it is called directly.

The kernel's numerics cannot be checked on a TPU here: the XLA path (`model.attention=xla`) stays
the tested reference; tests/test_plan_tpu.py compares this one with it in Pallas's interpreter
(marked slow).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax.core import spmd as flax_spmd
from jax.sharding import PartitionSpec as P

# Query and key/value tile (tokens); shorter sequences use one tile.
BLOCK = 512
# The kernel's tiles are whole multiples of the TPU's 128 lanes: a sequence of another length is
# padded at its end, where the causal mask keeps every real query from seeing the padding.
LANES = 128


@functools.cache  # one kernel per shape: equal configs trace to equal programs
def _kernel(seq_len: int, heads: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    b = min(BLOCK, seq_len)
    blocks = splash.BlockSizes(
        block_q=b,
        block_kv=b,
        block_kv_compute=b,
        block_q_dkv=b,
        block_kv_dkv=b,
        block_kv_dkv_compute=b,
        block_q_dq=b,
        block_kv_dq=b,
    )
    mask = splash.MultiHeadMask([splash.CausalMask((seq_len, seq_len))] * heads)
    return splash.make_splash_mha(
        mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret
    )


def _local(q_BTNH, k_BTNH, v_BTNH, *, interpret: bool):
    """One device's rows and heads: splash attention per example, in its [N, T, H] layout."""
    _, T, N, H = q_BTNH.shape
    padded = -(-T // LANES) * LANES
    kernel = _kernel(padded, N, interpret)
    # Splash does not scale the scores: 1/sqrt(H) goes on q, as jax.nn.dot_product_attention does.
    q_BTNH = (q_BTNH * (1.0 / math.sqrt(H))).astype(q_BTNH.dtype)
    to_NTH = lambda x: jnp.pad(x, ((0, 0), (0, padded - T), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    y_BNTH = jax.vmap(kernel)(to_NTH(q_BTNH), to_NTH(k_BTNH), to_NTH(v_BTNH))
    return y_BNTH.transpose(0, 2, 1, 3)[:, :T]


def causal_attention(q_BTNH, k_BTNH, v_BTNH, *, interpret: bool = False) -> jax.Array:
    """softmax(q k^T / sqrt(H), causal) v, as jax.nn.dot_product_attention(is_causal=True).

    `interpret`: run the kernel in Pallas's interpreter (any backend; for tests)."""
    local = functools.partial(_local, interpret=interpret)
    rules = dict(flax_spmd.get_logical_axis_rules())
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh.empty or mesh.size == 1:
        return local(q_BTNH, k_BTNH, v_BTNH)
    spec = P(rules["activation_batch"], None, rules["activation_heads"], None)
    return jax.shard_map(
        local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False
    )(q_BTNH, k_BTNH, v_BTNH)
