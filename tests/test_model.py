import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from llmjax import sharding
from llmjax.model import GPT, GPTConfig, constrain, count_params, flops_per_token, pad_vocab

AUTO = jax.sharding.AxisType.Auto  # what sharding.make_mesh's meshes use
TINY = GPTConfig(
    vocab_size=320, valid_vocab_size=257, n_layer=2, n_head=4, n_embd=64, block_size=32
)


def test_shapes_and_dtypes():
    model = GPT(TINY, nnx.Rngs(0))
    logits = model(jnp.zeros((3, 17), jnp.int32))
    assert logits.shape == (3, 17, 320) and logits.dtype == jnp.float32


def test_bf16_compute_keeps_f32_params():
    cfg = GPTConfig(**{**TINY.__dict__, "dtype": "bfloat16"})
    model = GPT(cfg, nnx.Rngs(0))
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(p.dtype == jnp.float32 for p in params)
    assert model(jnp.zeros((1, 5), jnp.int32)).dtype == jnp.float32  # loss stays f32


def test_causality():
    model = GPT(TINY, nnx.Rngs(0))
    idx = np.random.default_rng(0).integers(0, 257, (2, 16))
    base = model(jnp.asarray(idx))
    for t in (0, 7, 15):
        changed = idx.copy()
        changed[:, t] = (changed[:, t] + 1) % 257
        out = model(jnp.asarray(changed))
        np.testing.assert_array_equal(out[:, :t], base[:, :t])  # nothing before t moves
        assert not np.allclose(out[:, t], base[:, t])


def test_padded_logits_masked():
    model = GPT(TINY, nnx.Rngs(0))
    logits = model(jnp.zeros((1, 4), jnp.int32))
    probs = jax.nn.softmax(logits, axis=-1)
    assert float(probs[..., 257:].sum()) == 0.0
    assert int(jnp.argmax(logits, -1).max()) < 257


def test_init_loss_near_uniform():
    cfg = GPTConfig(**{**TINY.__dict__, "n_embd": 128})
    model = GPT(cfg, nnx.Rngs(0))
    idx = jnp.asarray(np.random.default_rng(1).integers(0, 257, (4, 32)))
    logits = model(idx[:, :-1])
    loss = -jnp.take_along_axis(jax.nn.log_softmax(logits), idx[:, 1:, None], -1).mean()
    # Nearly uniform: std-0.02 weights give logits of std ~0.02*sqrt(D) = 0.23 (+0.03 nats), and the
    # tied embedding lifts the current token's own logit by ~|wte_t|*sqrt(D) ~ 1.8 (+0.02 nats).
    assert 0.0 < float(loss) - math.log(257) < 0.1


def test_gpt2_124m_parameter_count():
    model = nnx.eval_shape(lambda: GPT(GPTConfig(), nnx.Rngs(0)))
    assert count_params(model, padding=False) == 124_439_808  # OpenAI GPT-2 small
    assert count_params(model) == 124_439_808 + (50304 - 50257) * 768
    assert pad_vocab(50257) == 50304


@pytest.mark.parametrize(
    "layers,width,expected",
    [(24, 1024, 354_823_168), (36, 1280, 774_030_080), (48, 1600, 1_557_611_200)],
)
def test_larger_gpt2_parameter_counts(layers, width, expected):
    cfg = GPTConfig(n_layer=layers, n_embd=width, n_head=16)
    model = nnx.eval_shape(lambda: GPT(cfg, nnx.Rngs(0)))
    assert count_params(model, padding=False) == expected  # transformers' GPT2 sizes


def test_residual_init_scaled():
    model = GPT(GPTConfig(**{**TINY.__dict__, "n_layer": 8}), nnx.Rngs(0))
    std = float(jnp.std(model.h[0].mlp.c_proj.kernel[...]))
    assert abs(std - 0.02 / math.sqrt(16)) < 0.0005
    assert abs(float(jnp.std(model.h[0].mlp.c_fc.kernel[...])) - 0.02) < 0.0005


def test_flops_per_token_hand_count():
    # llm.c: 6N + 6*L*C*T with N the padded parameter count (124,475,904 for GPT-2 124M).
    n = 124_475_904
    assert flops_per_token(GPTConfig(), n, 1024) == 6 * n + 6 * 12 * 768 * 1024
    # N by hand from the shapes: wte V*D, wpe T*D, per block 12*D^2 weights + 13*D biases/norms
    # (c_attn 3D^2+3D, c_proj D^2+D, c_fc 4D^2+4D, mlp c_proj 4D^2+D, two LayerNorms 4D), ln_f 2D.
    V, T, L, D = 50304, 1024, 12, 768
    assert V * D + T * D + L * (12 * D * D + 13 * D) + 2 * D == n
    # Untied (the speedrun's head): wte is only looked up, the head's V*D is the matmul counted.
    untied = dataclasses.replace(GPTConfig(), tie_embeddings=False)
    assert flops_per_token(untied, n + V * D, 1024) == 6 * n + 6 * 12 * 768 * 1024
    for scan in (False, True):  # the stacked layout holds the same parameters
        cfg = GPTConfig(scan_layers=scan)
        assert count_params(nnx.eval_shape(lambda cfg=cfg: GPT(cfg, nnx.Rngs(0)))) == n
    # Attention by hand: per layer and token, QK^T and AV are 2*T*D FLOPs each forward, halved by
    # the causal mask (2*T*D), times 3 for forward + backward.
    assert 6 * L * D * T == L * 3 * (2 * 2 * T * D) // 2
    fpt = flops_per_token(GPTConfig(), n, 1024)
    assert fpt == 803_478_528
    # The goal: 500K tokens/s on one H100 SXM (989 TFLOP/s dense bf16) is 40.6% MFU.
    assert 500_000 * fpt / 989e12 == pytest.approx(0.40621, abs=1e-5)


def _constraints(fn, *args) -> list:
    """The sharding constraints in `fn`'s jaxpr, outermost first, nested jaxprs included, as
    (spec, shape of the constrained array)."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "sharding_constraint":
                found.append((eqn.params["sharding"].spec, eqn.invars[0].aval.shape))
            for p in eqn.params.values():
                for sub in p if isinstance(p, (list, tuple)) else [p]:
                    if hasattr(sub, "jaxpr"):
                        walk(getattr(sub.jaxpr, "jaxpr", sub.jaxpr))

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def test_activation_names_are_no_ops_outside_a_mesh():
    # Sampling, conversion and direct calls run the model with no mesh: nothing is constrained,
    # and on a one-device mesh neither (the golden losses are those of the unconstrained model).
    model = GPT(TINY, nnx.Rngs(0))
    x = jnp.zeros((2, 8), jnp.int32)
    assert _constraints(lambda x: model(x), x) == []
    one = jax.sharding.AbstractMesh((1, 1, 1), sharding.MESH_AXES, axis_types=(AUTO,) * 3)
    with sharding.activation_rules(one):
        assert _constraints(lambda x: model(x), x) == []
    y = jnp.ones((2, 3))
    assert constrain(y, "BD") is y


@pytest.mark.parametrize("scan", [False, True])
def test_activation_names_map_through_the_rules(scan):
    cfg = GPTConfig(**{**TINY.__dict__, "scan_layers": scan})
    model = GPT(cfg, nnx.Rngs(0))
    mesh = jax.sharding.AbstractMesh((2, 2, 2), sharding.MESH_AXES, axis_types=(AUTO,) * 3)
    with sharding.activation_rules(mesh):
        found = _constraints(lambda x: model(x), jnp.zeros((8, 16), jnp.int32))
    batch, rows, tensor = ("data", "fsdp"), ("data", "fsdp", "tensor"), "tensor"
    # Activations (shape [8, 16, ...]): rows split like the batch, heads/hidden/vocab by tensor.
    acts = {spec for spec, shape in found if shape[:2] == (8, 16)}
    assert P(rows, None, None) in acts  # the residual stream: a share of the replica's rows
    assert P(batch, None, None) in acts  # norms' outputs gathered to the replica's rows
    assert P(batch, None, tensor, None) in acts  # q, k, v: heads over tensor
    assert P(batch, None, tensor) in acts  # MLP hidden units and the logits' vocabulary
    assert {spec[0] for spec in acts} == {batch, rows}
    # Every kernel as stored, then as its matmul uses it: fsdp's shard gathered, tensor's kept;
    # wte as the lookup and head use it.
    used = [(spec, shape) for spec, shape in found if shape[:2] != (8, 16)]
    per_layer = 1 if scan else cfg.n_layer
    pairs = list(zip(used, used[1:], strict=False))
    for stored, as_used, shape, n in [
        (P("fsdp", None, tensor), P(None, None, tensor), (64, 3, 64), per_layer),  # c_attn
        (P("fsdp", tensor), P(None, tensor), (64, 256), per_layer),  # c_fc
        (P(tensor, "fsdp"), P(tensor, None), (256, 64), per_layer),  # mlp.c_proj
        (P(tensor, "fsdp"), P(tensor, None), (64, 64), per_layer),  # attn.c_proj
    ]:
        assert pairs.count(((stored, shape), (as_used, shape))) == n, (shape, used)
    assert (P(tensor, None), (320, 64)) in used  # wte
    with pytest.raises(ValueError, match="name 2 dimensions of a 3-d array"):
        with sharding.activation_rules(mesh):
            constrain(jnp.ones((2, 3, 4)), "BD")
