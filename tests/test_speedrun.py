"""The speedrun recipe: each architecture option against a hand computation, Muon against a NumPy
Newton-Schulz, and the recipe through decode, scanned layers and meshes like GPT-2."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llmjax.config import base_config, validate
from llmjax.hf_gpt2 import ConvertError, to_hf
from llmjax.loss import chunked_ce
from llmjax.model import (
    GPT,
    MASKED_LOGIT,
    GPTConfig,
    gpt2_departures,
    model_config,
    rms_norm,
    rotary,
    stack_layers,
)
from llmjax.optim import (
    lr_schedule,
    make_optimizer,
    muon_labels,
    muon_momentum,
    newton_schulz_flops,
)
from tests.conftest import run_json
from tests.test_model import TINY

RECIPE = dict(
    position="rope",
    norm="rmsnorm",
    qk_norm=True,
    mlp="relu2",
    bias=False,
    tie_embeddings=False,
    zero_init_proj=False,  # zero projections would make every block the identity: nothing to test
    logit_cap=15.0,
    x0_mix=True,
)
MODERN = dataclasses.replace(TINY, **RECIPE)


def _params(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _randomize(model, seed=1):
    # Zero-initialised heads and (1, 0) x0 mixes hide mistakes: give every weight a random value.
    params = _params(model)
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(params))))
    params = jax.tree.map(lambda p: 0.1 * jax.random.normal(next(keys), p.shape), params)
    nnx.update(model, params)
    return model


def _ns_reference(g, steps=5, coeffs=(3.4445, -4.7750, 2.0315)):
    """Keller Jordan's quintic Newton-Schulz, float64, wide orientation."""
    x = np.asarray(g, np.float64)
    transposed = x.shape[0] > x.shape[1]
    x = x.T if transposed else x
    x = x / (np.linalg.norm(x) + 1e-8)
    a, b, c = coeffs
    for _ in range(steps):
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return x.T if transposed else x


def _optim(**kw):
    c = base_config().optim
    c.update(dict(warmup_steps=0, grad_clip=0.0, name="muon", min_lr=c.lr))
    c.update(kw)
    return c


# --- architecture --------------------------------------------------------------------------------


def test_gpt2_is_the_default():
    assert gpt2_departures(GPTConfig()) == []
    assert gpt2_departures(model_config(base_config())) == []
    assert gpt2_departures(MODERN) == [
        f"{k}={v!r}" for k, v in RECIPE.items() if k != "zero_init_proj"
    ]
    names = {
        jax.tree_util.keystr(p)
        for p, _ in jax.tree_util.tree_leaves_with_path(_params(GPT(MODERN, nnx.Rngs(0))))
    }
    assert "['wpe']['embedding']" not in names and "['lm_head']['embedding']" in names
    assert not any("bias" in n or "scale" in n for n in names)  # no biases, parameter-free norms


def test_rotary_matches_complex_rotation():
    rng = np.random.default_rng(0)
    B, T, N, H = 2, 5, 3, 8
    x = rng.normal(size=(B, T, N, H)).astype(np.float32)
    pos = np.arange(7, 7 + T)
    got = np.asarray(rotary(jnp.asarray(x), jnp.asarray(pos)))
    # Pairs (i, i + H/2) as complex numbers, each turned by pos * 10000^(-2i/H).
    theta = 10000.0 ** (-np.arange(H // 2) * 2.0 / H)
    z = (x[..., : H // 2] + 1j * x[..., H // 2 :]) * np.exp(1j * pos[:, None, None] * theta)[None]
    want = np.concatenate([z.real, z.imag], axis=-1)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # Relative: a query-key dot product depends only on the distance between positions.
    q, k = x[:1, :1], x[1:, :1]
    dots = [
        float(
            np.sum(
                np.asarray(rotary(jnp.asarray(q), jnp.asarray([p + 3])))
                * np.asarray(rotary(jnp.asarray(k), jnp.asarray([p])))
            )
        )
        for p in (0, 11)
    ]
    np.testing.assert_allclose(dots[0], dots[1], rtol=1e-4)


def test_rms_norm_and_relu2_mlp_and_qk_norm_attention_by_hand():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 6, 64)).astype(np.float32) * 3
    np.testing.assert_allclose(
        rms_norm(jnp.asarray(x)), x / np.sqrt(np.mean(x**2, -1, keepdims=True) + 1e-6), rtol=1e-5
    )
    model = _randomize(GPT(MODERN, nnx.Rngs(0)))
    block = model.h[0]
    # ReLU^2 MLP, no biases.
    w_fc, w_proj = (np.asarray(m.kernel[...]) for m in (block.mlp.c_fc, block.mlp.c_proj))
    want = np.maximum(x @ w_fc, 0) ** 2 @ w_proj
    np.testing.assert_allclose(block.mlp(jnp.asarray(x)), want, rtol=2e-4, atol=2e-4)
    # Attention: RMSNorm of q and k per head, rotary, causal softmax, c_proj.
    B, T, D, N, H = 2, 6, 64, 4, 16
    w_qkv = np.asarray(block.attn.c_attn.kernel[...])  # [D, 3, D]
    q, k, v = (np.einsum("btd,df->btf", x, w_qkv[:, i]).reshape(B, T, N, H) for i in range(3))
    norm = lambda a: a / np.sqrt(np.mean(a**2, -1, keepdims=True) + 1e-6)
    q, k = (np.asarray(rotary(jnp.asarray(norm(a)), jnp.arange(T))) for a in (q, k))
    s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H)
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    y = np.einsum("bnts,bsnh->btnh", p, v).reshape(B, T, D) @ np.asarray(
        block.attn.c_proj.kernel[...]
    )
    got, _ = block.attn(jnp.asarray(x))
    np.testing.assert_allclose(got, y, rtol=2e-4, atol=2e-4)


def test_x0_mix_and_soft_cap_by_hand():
    model = _randomize(GPT(MODERN, nnx.Rngs(0)))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 4, 64)), jnp.float32)
    x0 = jnp.asarray(np.random.default_rng(2).normal(size=(1, 4, 64)), jnp.float32)
    block = model.h[0]
    a, b = np.asarray(block.x0_lambdas[...])
    np.testing.assert_allclose(
        block(x, x0)[0], block(a * x + b * x0, None)[0], rtol=1e-5, atol=1e-5
    )
    h = model.hidden(jnp.zeros((1, 3), jnp.int32))
    raw = np.asarray(h) @ np.asarray(model.lm_head.embedding[...]).T
    want = np.where(np.arange(320) < 257, 15.0 * np.tanh(raw / 15.0), MASKED_LOGIT)
    np.testing.assert_allclose(model.logits(h), want, rtol=1e-5, atol=1e-5)


def test_soft_capped_chunked_loss_matches_dense_value_and_gradient():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 9, 16)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(64, 16)), jnp.float32)
    tgt = jnp.asarray(rng.integers(0, 50, (2, 9)))
    wt = jnp.ones((2, 9), jnp.float32)

    def dense(x, w):
        logits = 3.0 * jnp.tanh(x @ w.T / 3.0)
        logits = jnp.where(jnp.arange(64) < 50, logits, MASKED_LOGIT)
        return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), tgt[..., None], -1))

    chunked = lambda x, w: chunked_ce(x, w, tgt, wt, valid_vocab=50, chunk=8, logit_cap=3.0)
    np.testing.assert_allclose(chunked(x, w), dense(x, w), rtol=1e-5)
    for got, want in zip(
        jax.grad(chunked, (0, 1))(x, w), jax.grad(dense, (0, 1))(x, w), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scan", [False, True])
def test_decode_matches_full_forward_position_by_position(scan):
    cfg = dataclasses.replace(MODERN, scan_layers=scan)
    model = _randomize(GPT(cfg, nnx.Rngs(0)))
    idx = jnp.asarray(np.random.default_rng(0).integers(0, 257, (2, 12)))
    full = model(idx)
    cache = model.init_cache(2, 16)
    decode = nnx.jit(lambda m, idx, cache, pos: m.decode(idx, cache, pos))
    logits, cache = decode(model, idx[:, :5], cache, 0)  # a prompt, then one token at a time
    np.testing.assert_allclose(logits, full[:, :5], rtol=1e-4, atol=1e-4)
    for t in range(5, 12):
        logits, cache = decode(model, idx[:, t : t + 1], cache, jnp.int32(t))
        np.testing.assert_allclose(logits[:, 0], full[:, t], rtol=1e-4, atol=1e-4)


def test_scanned_and_unrolled_layers_agree():
    model = _randomize(GPT(MODERN, nnx.Rngs(0)))
    scanned = GPT(dataclasses.replace(MODERN, scan_layers=True), nnx.Rngs(0))
    nnx.update(scanned, stack_layers(_params(model)))
    idx = jnp.asarray(np.random.default_rng(0).integers(0, 257, (2, 10)))
    np.testing.assert_allclose(model(idx), scanned(idx), rtol=1e-5, atol=1e-5)


# --- Muon ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("scan", [False, True])
def test_muon_takes_the_blocks_matrices_by_name(scan):
    for cfg in (TINY, MODERN):
        params = _params(GPT(dataclasses.replace(cfg, scan_layers=scan), nnx.Rngs(0)))
        flat = {
            jax.tree_util.keystr(k): v
            for k, v in jax.tree_util.tree_leaves_with_path(muon_labels(params))
        }
        muon = sorted(k for k, v in flat.items() if v == "muon")
        layers = [""] if scan else ["[0]", "[1]"]
        assert muon == sorted(
            f"['h']{i}{m}['kernel']"
            for i in layers
            for m in (
                "['attn']['c_attn']",
                "['attn']['c_proj']",
                "['mlp']['c_fc']",
                "['mlp']['c_proj']",
            )
        )
        # Everything else, 2-D or not (wte, lm_head, c_attn's [3, D] bias), goes to AdamW.
        assert all(flat[k] == "adamw" for k in flat if k not in muon)


@pytest.mark.parametrize("scan", [False, True])
def test_newton_schulz_flops_by_hand(scan):
    # Per quintic step on an m x n matrix (m <= n): X X^T 2m^2n, A^2 2m^3, (bA + cA^2) X 2m^2n.
    # A block has q, k, v and attn.c_proj (D x D: 6D^3 each) and c_fc, mlp.c_proj (D x 4D:
    # 4*4D^3 + 2D^3 = 18D^3 each): 5 steps x (4 x 6 + 2 x 18) D^3 = 300 D^3.
    params = _params(GPT(dataclasses.replace(TINY, scan_layers=scan), nnx.Rngs(0)))
    D = TINY.n_embd
    assert newton_schulz_flops(params) == TINY.n_layer * 300 * D**3


def test_one_muon_step_matches_numpy_newton_schulz():
    rng = np.random.default_rng(0)
    g_fc = rng.normal(size=(6, 10)).astype(np.float32)  # fan_out > fan_in: scaled by sqrt(10/6)
    g_attn = rng.normal(size=(5, 3, 5)).astype(np.float32)  # q, k, v orthogonalised apart
    params = {
        "h": {
            0: {
                "mlp": {"c_fc": {"kernel": np.zeros((6, 10), np.float32)}},
                "attn": {"c_attn": {"kernel": np.zeros((5, 3, 5), np.float32)}},
            }
        },
        "wte": {"embedding": np.ones((4, 5), np.float32)},
    }
    grads = {
        "h": {0: {"mlp": {"c_fc": {"kernel": g_fc}}, "attn": {"c_attn": {"kernel": g_attn}}}},
        "wte": {"embedding": np.zeros((4, 5), np.float32)},
    }
    tx = make_optimizer(_optim(muon_lr=0.05, lr=0.01, weight_decay=0.1), 10)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    u = updates["h"][0]
    # With Frobenius normalisation first, the first step's direction is the gradient's.
    want_fc = -0.05 * np.sqrt(10 / 6) * _ns_reference(g_fc)
    np.testing.assert_allclose(u["mlp"]["c_fc"]["kernel"], want_fc, rtol=2e-3, atol=2e-4)
    for i in range(3):
        want = -0.05 * _ns_reference(g_attn[:, i])
        np.testing.assert_allclose(u["attn"]["c_attn"]["kernel"][:, i], want, rtol=2e-3, atol=2e-4)
    # AdamW on the embedding: zero gradient, so only the decoupled decay, -lr * wd * w.
    np.testing.assert_allclose(updates["wte"]["embedding"], -0.01 * 0.1, rtol=1e-5)


def test_schedules():
    c = _optim(lr=1.0, min_lr=0.1, warmup_steps=10, schedule="wsd", decay_frac=0.2)
    s = lr_schedule(c, 100)
    got = [float(s(i)) for i in (0, 5, 10, 50, 80, 90, 100)]
    np.testing.assert_allclose(got, [0, 0.5, 1, 1, 1, 0.55, 0.1], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(lr_schedule(c, 100, peak=0.02)(90)), 0.011, rtol=1e-5)
    m = muon_momentum(_optim(muon_momentum_start=0.85, muon_momentum=0.95, muon_momentum_warmup=10))
    np.testing.assert_allclose([float(m(i)) for i in (0, 5, 10, 50)], [0.85, 0.9, 0.95, 0.95])


def test_muon_momentum_warmup_changes_the_second_step():
    params = {"h": {0: {"mlp": {"c_fc": {"kernel": np.zeros((6, 8), np.float32)}}}}}
    g = [np.random.default_rng(i).normal(size=(6, 8)).astype(np.float32) for i in range(2)]

    def second(**kw):
        tx = make_optimizer(_optim(**kw), 10)
        state = tx.init(params)
        for gi in g:
            u, state = tx.update({"h": {0: {"mlp": {"c_fc": {"kernel": gi}}}}}, state, params)
        return np.asarray(u["h"][0]["mlp"]["c_fc"]["kernel"])

    assert not np.allclose(second(muon_momentum_warmup=0), second(muon_momentum_warmup=5))


def test_config_keys_validated():
    c = base_config()
    c.model.position = "alibi"
    with pytest.raises(Exception, match="model.position"):
        validate(c)
    c = base_config()
    c.optim.name = "sgd"
    with pytest.raises(Exception, match="optim.name"):
        validate(c)


# --- the recipe under meshes ---------------------------------------------------------------------

_CHILD = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from llmjax.config import base_config, validate
from llmjax.batches import objective
from llmjax.train import build

out = {}
for name, mesh in json.loads(sys.argv[1]).items():
    for scan in (False, True):
        c = base_config()
        c.model.update(dict(n_layer=2, n_head=4, n_embd=64, block_size=32, scan_layers=scan))
        c.model.update(json.loads(sys.argv[2]))
        c.data.update(dict(tokenizer="bytes", batch_size=8, seq_len=32))
        c.optim.update(dict(name="muon", schedule="wsd", warmup_steps=1, muon_momentum_warmup=2))
        c.train.steps = 4
        c.mesh.update(mesh)
        validate(c)
        run = build(c, objective(c, "pretrain"), jax.devices()[: int(np.prod(list(mesh.values())))])
        state = jax.jit(run.init, out_shardings=run.state_shardings)()
        batch = jnp.asarray(np.random.default_rng(0).integers(0, 256, (8, 33)), jnp.int32)
        losses = []
        for _ in range(3):
            state, m = run.train_step(state, batch)
            losses.append(float(m["train/loss"]))
        mu = state.opt_state[1]["muon"][0].inner_state.mu
        h = mu["h"] if scan else mu["h"][0]
        shard = h["attn"]["c_attn"]["kernel"]
        out[f"{name}{'_scan' if scan else ''}"] = dict(
            losses=losses, mu_shard=list(shard.addressable_shards[0].data.shape)
        )
print(json.dumps(out))
"""


@pytest.mark.slow
def test_recipe_same_losses_on_every_mesh():
    meshes = {
        "one": {"data": 1},
        "fsdp4": {"data": 1, "fsdp": 4},
        "data2_tensor2": {"data": 2, "tensor": 2},
        "fsdp2_tensor2": {"data": 1, "fsdp": 2, "tensor": 2},
    }
    arch = {k: v for k, v in RECIPE.items() if k != "zero_init_proj"}
    env = dict(
        os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4"
    )
    out = run_json(["-c", _CHILD, json.dumps(meshes), json.dumps(arch)], env)
    for name, got in out.items():
        np.testing.assert_allclose(got["losses"], out["one"]["losses"], rtol=2e-4, err_msg=name)
    # Muon's momentum of c_attn lives where the kernel does: split by fsdp on D, by tensor on heads.
    assert out["one"]["mu_shard"] == [64, 3, 64]
    assert out["fsdp4"]["mu_shard"] == [16, 3, 64]
    assert out["fsdp2_tensor2"]["mu_shard"] == [32, 3, 32]
    assert out["fsdp2_tensor2_scan"]["mu_shard"] == [2, 32, 3, 32]


def test_hf_export_refuses_the_recipe(tmp_path):
    with pytest.raises(ConvertError, match=r"departs from GPT-2 \(position='rope'"):
        to_hf(GPT(MODERN, nnx.Rngs(0)), str(tmp_path / "hf"))
    assert not os.path.exists(tmp_path / "hf")
