"""The chunked loss (loss.py) against a plain full-logits reference, and what the compiled step
holds: never the [B, T, V] logits.

The reference is independent of loss.py: the model's own full logits (`GPT.__call__`, padded ids
masked) through optax's softmax cross-entropy, weighted by the scored targets, differentiated by
jax. Float32 throughout, so the two may differ only by float32 rounding (summation order).
"""

from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from llmjax import sharding
from llmjax.loss import lm_loss
from llmjax.model import GPT, GPTConfig
from tests.conftest import pretrain_run, run_json, run_plan, tiny_config

# Padded vocabulary: 261 ids the tokenizer could produce, 320 embedding rows.
CFG = GPTConfig(vocab_size=320, valid_vocab_size=261, n_layer=2, n_head=4, n_embd=32, block_size=64)
B, T = 4, 24
RTOL = 1e-6  # float32: the loss and every gradient leaf (relative to the leaf's norm)


def reference_loss(params, graphdef, batch_BT1, z_loss: float = 0.0):
    tokens_BT1 = jnp.where(batch_BT1 < 0, -1 - batch_BT1, batch_BT1)
    weights_BT = (batch_BT1[:, 1:] >= 0).astype(jnp.float32)
    logits_BTV = nnx.merge(graphdef, params)(tokens_BT1[:, :-1])
    ce_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, tokens_BT1[:, 1:])
    lse_BT = jax.nn.logsumexp(logits_BTV[..., : CFG.valid_vocab_size], axis=-1)
    return ((ce_BT + z_loss * lse_BT**2) * weights_BT).sum(), weights_BT.sum()


def make_batch(kind: str, rows: int = B, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    batch = rng.integers(0, CFG.valid_vocab_size, (rows, T + 1)).astype(np.int32)
    if kind == "finetune":
        # Prompts read as context only (-1-id), and one row padded with context-only EOT.
        batch[:, :9] = -1 - batch[:, :9]
        batch[1, 17:] = -1 - 3
    return batch


def model_params():
    graphdef, params = nnx.split(GPT(CFG, nnx.Rngs(0)), nnx.Param)
    return graphdef, nnx.to_pure_dict(params)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def assert_grads_close(grads, ref_grads) -> None:
    errs = jax.tree.map(rel_err, grads, ref_grads)
    worst = max(jax.tree_util.tree_flatten_with_path(errs)[0], key=lambda kv: kv[1])
    assert worst[1] <= RTOL, f"{jax.tree_util.keystr(worst[0])}: relative error {worst[1]:.2e}"


@pytest.mark.parametrize("kind", ["pretrain", "finetune"])
@pytest.mark.parametrize(
    "chunk",
    [
        B * T,  # one chunk
        B * 8,  # 8 positions: divides T
        B * 5,  # 5 positions: the last chunk overlaps its predecessor
        1,  # one position per chunk
        10**6,  # more than the batch holds
    ],
)
def test_loss_and_grads_equal_full_logits_reference(kind, chunk):
    graphdef, params = model_params()
    batch = make_batch(kind)
    scored = (batch[:, 1:] >= 0).sum()
    assert scored == (B * T if kind == "pretrain" else B * T - 4 * 8 - 8)
    batch = jnp.asarray(batch)
    ref_grad = jax.value_and_grad(reference_loss, has_aux=True)
    (ref, ref_n), ref_g = jax.jit(ref_grad, static_argnums=1)(params, graphdef, batch)
    loss_fn = lambda p, b: lm_loss(p, graphdef, b, None, True, chunk=chunk)
    (got, n), g = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, batch)
    evaluated, n_eval = jax.jit(loss_fn)(params, batch)  # the eval path: no gradient
    assert float(n) == float(ref_n) == float(n_eval) == scored
    assert abs(float(got) - float(ref)) <= RTOL * abs(float(ref))
    assert abs(float(evaluated) - float(ref)) <= RTOL * abs(float(ref))
    assert_grads_close(g, ref_g)


def test_z_loss_adds_logsumexp_squared():
    graphdef, params = model_params()
    batch = jnp.asarray(make_batch("finetune"))
    z = 1e-2  # large enough that the term moves the gradient well past the tolerance
    ref_grad = jax.value_and_grad(reference_loss, has_aux=True)
    (ref, _), ref_g = jax.jit(ref_grad, static_argnums=(1, 3))(params, graphdef, batch, z)
    (plain, _), plain_g = jax.jit(ref_grad, static_argnums=1)(params, graphdef, batch)
    loss_fn = lambda p: lm_loss(p, graphdef, batch, None, True, chunk=B * 5, z_loss=z)
    (got, _), g = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    assert abs(float(got) - float(ref)) <= RTOL * abs(float(ref))
    assert float(got) > float(plain) * (1 + 1e-3)
    assert_grads_close(g, ref_g)
    assert rel_err(g["wte"]["embedding"], plain_g["wte"]["embedding"]) > 100 * RTOL


def _arrays(hlo_text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [
        (dtype, tuple(int(d) for d in dims.split(",") if d))
        for dtype, dims in re.findall(r"\b(f32|bf16|f16)\[([0-9,]*)\]", hlo_text)
    ]


def assert_no_full_logits(hlo_text: str, batch: int, seq: int, vocab: int, chunk_pos: int) -> None:
    sizes = {(dtype, int(np.prod(dims))) for dtype, dims in _arrays(hlo_text)}
    biggest = max(n for _, n in sizes)
    assert biggest < batch * seq * vocab, f"an array of {biggest} >= B*T*V elements"
    # Not vacuous: the chunk's logits are there.
    assert any(n == batch * chunk_pos * vocab for _, n in sizes), sorted(sizes)[-5:]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_compiled_step_never_holds_the_batch_logits(byte_data, dtype):
    """configs/tiny.py (B=8, T=32, V=320), 8 positions per chunk: the CPU program's largest
    array is smaller than B*T*V, in any float dtype."""
    cfg = tiny_config(byte_data, **{"train.loss_chunk": 64, "model.dtype": dtype})
    run = pretrain_run(cfg)
    batch = jax.ShapeDtypeStruct((8, 33), jnp.int32, sharding=sharding.batch_sharding(run.mesh))
    text = run.train_step.lower(run.abstract_state, batch).compile().as_text()
    assert_no_full_logits(text, 8, 32, 320, 8)


@pytest.mark.plan
def test_gpu_program_never_holds_the_batch_logits(tmp_path):
    """The same on the deviceless H100 program of configs/tiny.py in bf16 (cuDNN attention)."""
    run_plan(
        "--config=configs/tiny.py",
        "--config.model.dtype=bfloat16",
        "--config.train.loss_chunk=64",
        f"--dump={tmp_path}",
    )
    with open(tmp_path / "train_step.after_optimizations.hlo") as f:
        assert_no_full_logits(f.read(), 8, 32, 320, 8)


def _mesh_child() -> None:
    """Runs with 8 CPU devices: the loss and gradients on a data=2 x fsdp=2 x tensor=2 mesh,
    traced under the activation rules as the train step is, against the one-device reference."""
    import ml_collections

    assert jax.device_count() == 8
    mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 2, "fsdp": 2, "tensor": 2}))
    graphdef, params = model_params()
    abstract = nnx.state(nnx.eval_shape(lambda: GPT(CFG, nnx.Rngs(0))), nnx.Param)
    param_sh = sharding.param_shardings(abstract, mesh)
    batch_sh = sharding.batch_sharding(mesh)
    out = {}
    for kind in ("pretrain", "finetune"):
        batch = make_batch(kind, rows=8)
        ref_grad = jax.value_and_grad(reference_loss, has_aux=True)
        (ref, _), ref_g = jax.jit(ref_grad, static_argnums=1)(params, graphdef, jnp.asarray(batch))
        for chunk in (8 * 8, 8 * 5):
            fn = lambda p, b, chunk=chunk: lm_loss(p, graphdef, b, None, True, chunk=chunk)
            step = jax.jit(
                sharding.under_rules(jax.value_and_grad(fn, has_aux=True), mesh),
                in_shardings=(param_sh, batch_sh),
            )
            (got, _), g = step(jax.device_put(params, param_sh), jax.device_put(batch, batch_sh))
            errs = jax.tree.leaves(jax.tree.map(rel_err, g, ref_g))
            out[f"{kind}/{chunk}"] = [float(got), float(ref), max(errs)]
    print(json.dumps(out))


def test_equal_under_a_2x2x2_mesh():
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0",
    )
    code = "from tests.test_loss import _mesh_child; _mesh_child()"
    out = run_json(["-c", code], env)
    assert len(out) == 4
    for name, (got, ref, grad_err) in out.items():
        assert abs(got - ref) <= RTOL * abs(ref), name
        assert grad_err <= RTOL, (name, grad_err)
