"""CPU checks of the speed features: layer scan, remat, mixed precision, GPU flags, benchmarks.

GPU timings themselves live in benchmarks/ (never in tests); these tests pin down that the fast
paths compute the same numbers as the plain one.
"""

import dataclasses
import functools
import os
import subprocess
import sys

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import pretrain_run, run_json, tiny_config
from flax import nnx

from llmjax import xla_flags
from llmjax.model import (
    GPT,
    REMAT_POLICIES,
    GPTConfig,
    count_params,
    stack_layers,
    unstack_layers,
)

TINY = GPTConfig(
    vocab_size=320, valid_vocab_size=257, n_layer=3, n_head=4, n_embd=64, block_size=32
)


def _graphdef(cfg: GPTConfig):
    return nnx.graphdef(nnx.eval_shape(lambda: GPT(cfg, nnx.Rngs(0))))


@pytest.fixture(scope="module")
def params() -> dict:
    """Unscanned TINY parameters, initialised once (jitted: eager init is slow on CPU)."""
    return jax.jit(lambda: nnx.to_pure_dict(nnx.state(GPT(TINY, nnx.Rngs(0)), nnx.Param)))()


def _loss_and_grads(cfg: GPTConfig, params, idx_BT, dropout_key):
    graphdef = _graphdef(cfg)

    def loss_fn(params):
        model = nnx.merge(graphdef, params)
        logits_BTV = model(idx_BT[:, :-1], deterministic=False, rngs=nnx.Rngs(dropout=dropout_key))
        return optax.softmax_cross_entropy_with_integer_labels(logits_BTV, idx_BT[:, 1:]).mean()

    return jax.jit(jax.value_and_grad(loss_fn))(params)


def _batch(B=4, T=17):
    return jnp.asarray(np.random.default_rng(0).integers(0, 257, (B, T)), jnp.int32)


def _assert_trees_close(a, b, rtol, atol):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_layout_conversion_round_trips_and_matches_scanned_model(params):
    stacked = stack_layers(params)
    scanned = nnx.to_pure_dict(
        nnx.state(
            nnx.eval_shape(lambda: GPT(dataclasses.replace(TINY, scan_layers=True), nnx.Rngs(0))),
            nnx.Param,
        )
    )
    # Same tree and shapes as a scanned model's own parameters: [L, ...] on every block leaf.
    assert jax.tree.structure(stacked) == jax.tree.structure(scanned)
    for a, b in zip(jax.tree.leaves(stacked), jax.tree.leaves(scanned), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
    assert stacked["h"]["mlp"]["c_fc"]["kernel"].shape == (3, 64, 256)
    np.testing.assert_array_equal(
        stacked["h"]["attn"]["c_attn"]["kernel"][2], params["h"][2]["attn"]["c_attn"]["kernel"]
    )
    back = unstack_layers(stacked)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
    # numpy in, numpy out (checkpoint/HF conversion works on host arrays); string keys accepted.
    host = jax.tree.map(np.asarray, params)
    host["h"] = {str(k): v for k, v in host["h"].items()}
    assert isinstance(jax.tree.leaves(stack_layers(host)["h"])[0], np.ndarray)


def test_scanned_model_has_layer_axis_and_same_size():
    model = nnx.eval_shape(lambda: GPT(dataclasses.replace(TINY, scan_layers=True), nnx.Rngs(0)))
    specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(model, nnx.Param)))
    assert tuple(specs["h"]["mlp"]["c_fc"]["kernel"]) == ("layers", "embed", "mlp")
    assert tuple(specs["h"]["ln_1"]["scale"]) == ("layers", "embed")
    assert count_params(model) == count_params(nnx.eval_shape(lambda: GPT(TINY, nnx.Rngs(0))))


def test_scan_and_remat_same_loss_and_grads(params):
    """Scanned layers and each remat policy against the plain unrolled model, dropout on (the same
    per-layer keys must give the same masks, also when remat recomputes them)."""
    cfg, idx, key = dataclasses.replace(TINY, dropout=0.1), _batch(), jax.random.key(3)
    loss0, grads0 = _loss_and_grads(cfg, params, idx, key)
    for scan, remat in [(True, "none"), (False, "dots_saveable"), (True, "full")]:
        variant = dataclasses.replace(cfg, scan_layers=scan, remat=remat)
        loss, grads = _loss_and_grads(variant, stack_layers(params) if scan else params, idx, key)
        grads = unstack_layers(grads) if scan else grads
        # float32 on CPU; only the order of XLA's fused reductions differs between the programs.
        np.testing.assert_allclose(float(loss), float(loss0), rtol=1e-6, err_msg=str((scan, remat)))
        _assert_trees_close(grads, grads0, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("remat", ["dots_saveable", "full"])
def test_remat_wraps_every_block_with_its_policy(params, scan, remat):
    cfg = dataclasses.replace(TINY, scan_layers=scan, remat=remat)
    graphdef = _graphdef(cfg)
    p = stack_layers(params) if scan else params
    jaxpr = jax.make_jaxpr(lambda p: nnx.merge(graphdef, p)(_batch()))(p)

    def checkpoints(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "remat2":  # jax.checkpoint
                # The outermost ones: a block's own (the GELU it recomputes sits inside).
                yield eqn.params["policy"]
                continue
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from checkpoints(sub)

    policies = list(checkpoints(jaxpr.jaxpr))
    assert policies == [REMAT_POLICIES[remat]] * (1 if scan else TINY.n_layer)


def test_scanned_decode_equals_unscanned(params):
    idx = _batch(2, 12)

    @functools.partial(jax.jit, static_argnums=0)
    def prefill_then_decode(graphdef, params):
        model = nnx.merge(graphdef, params)
        cache = model.init_cache(2, 24)
        out, cache = model.decode(idx[:, :8], cache, 0)
        outs = [out]
        for t in range(8, 12):
            out, cache = model.decode(idx[:, t : t + 1], cache, t)
            outs.append(out)
        return jnp.concatenate(outs, axis=1), cache

    out_u, cache_u = prefill_then_decode(_graphdef(TINY), params)
    out_s, cache_s = prefill_then_decode(
        _graphdef(dataclasses.replace(TINY, scan_layers=True)), stack_layers(params)
    )
    assert cache_s[0].shape == (3, 2, 24, 4, 16)
    np.testing.assert_allclose(out_s, out_u, rtol=1e-5, atol=1e-5)
    for i in range(TINY.n_layer):
        np.testing.assert_allclose(cache_s[0][i], cache_u[i][0], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(cache_s[1][i], cache_u[i][1], rtol=1e-6, atol=1e-6)
    # The decode logits are those of the plain forward pass over the same 12 tokens.
    full = jax.jit(lambda p: nnx.merge(_graphdef(TINY), p)(idx))(params)
    np.testing.assert_allclose(out_u, full, rtol=1e-4, atol=1e-4)


def _dots(jaxpr) -> list[tuple]:
    """(lhs aval, rhs aval) of every dot_general, sub-jaxprs (scan, remat, jit) included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(tuple(v.aval for v in eqn.invars))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += _dots(sub)
    return found


def test_bf16_compute_matmuls_bf16_master_weights_f32(tmp_path):

    B, T, N = 8, 32, 4
    batch = jnp.asarray(np.random.default_rng(0).integers(0, 257, (B, T + 1)), jnp.int32)
    for scan in (False, True):
        cfg = tiny_config(
            str(tmp_path),
            **{
                "model.dtype": "bfloat16",
                "model.scan_layers": scan,
                "model.remat": "dots_saveable",
            },
        )
        run = pretrain_run(cfg)
        dots = _dots(jax.make_jaxpr(run.train_step)(run.abstract_state, batch).jaxpr)
        layers = 1 if scan else cfg.model.n_layer  # a scan body is traced once
        # Forward, input-grad and weight-grad of the 4 weight matmuls, 6 attention ones, lm head.
        assert len(dots) >= layers * (3 * 4 + 6) + 3
        upcast = [(a, b) for a, b in dots if not a.dtype == b.dtype == jnp.bfloat16]
        # No weight matmul runs in float32. The only mixed ones are the two score-gradient matmuls
        # of jax.nn.dot_product_attention's XLA backward (dS [B,N,T,1,S] float32 x q or k bf16):
        # a jax choice, absent from the cuDNN path used on GPU (see benchmarks/NOTES.md).
        assert len(upcast) == 2 * layers, upcast
        assert all(
            a.shape == (B, N, T, 1, T) and a.dtype == jnp.float32 and b.dtype == jnp.bfloat16
            for a, b in upcast
        ), upcast
    state = run.init()
    state, metrics = run.train_step(state, batch)
    assert np.isfinite(float(metrics["train/loss"]))
    assert metrics["train/loss"].dtype == jnp.float32
    # Master weights and both Adam moments stay float32.
    leaves = jax.tree.leaves(state.params) + jax.tree.leaves(state.opt_state)
    floats = [x for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)]
    assert len(floats) >= 3 * len(jax.tree.leaves(state.params))
    assert all(x.dtype == jnp.float32 for x in floats)
    # And the logits the loss sees are float32.
    model = nnx.merge(run.graphdef, state.params)
    assert jax.eval_shape(lambda: model(batch[:, :8])).dtype == jnp.float32


def test_config_keys_reach_the_model():
    from llmjax.model import model_config

    cfg = tiny_config("", **{"model.scan_layers": True, "model.remat": "full"})
    mc = model_config(cfg, "gpu")
    assert mc.scan_layers is True and mc.remat == "full"
    assert model_config(tiny_config(""), "cpu").scan_layers is False  # unrolled by default


def test_xla_flags_only_on_gpu_and_user_flags_win():
    env = {"XLA_FLAGS": "--xla_gpu_enable_latency_hiding_scheduler=false --xla_dump_to=/tmp/d"}
    assert not xla_flags.apply(dict(env), gpu=False)
    assert not xla_flags.gpu_expected({"JAX_PLATFORMS": "cpu"})
    applied = dict(env)
    assert xla_flags.apply(applied, gpu=True)
    flags = applied["XLA_FLAGS"].split()
    assert flags[:2] == env["XLA_FLAGS"].split()  # the user's own, unchanged, first
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" not in flags
    assert "--xla_gpu_all_reduce_combine_threshold_bytes=134217728" in flags
    assert len(flags) == 2 + len(xla_flags.GPU_XLA_FLAGS) - 1


def test_xla_accepts_every_gpu_flag():
    # XLA aborts on an unknown flag; the CPU jaxlib parses the GPU flags too, so this catches a
    # renamed or removed flag before a GPU run does.
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags.merged_xla_flags(""))
    out = subprocess.run(
        [sys.executable, "-c", "import jax.numpy as j; print(j.ones(3).sum())"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and out.stdout.strip() == "3.0", out.stderr[-500:]


def _bench(script: str, *args: str) -> dict:
    bench = [
        os.path.join("benchmarks", script),
        "--config=configs/tiny.py",
        "--steps=3",
        "--warmup=1",
    ]
    return run_json([*bench, *args], dict(os.environ, JAX_PLATFORMS="cpu"))


def _check_result(r: dict, B: int, T: int, n_params: int) -> None:
    assert r["batch_size"] == B and r["seq_len"] == T and r["n_params"] == n_params
    assert r["tokens_per_sec"] == pytest.approx(B * T / (r["ms_per_step"] / 1e3))
    assert r["flops_per_token"] == 6 * n_params + 6 * 2 * 64 * T  # tiny: L=2, D=64
    assert r["mfu"] is None and r["peak_memory_bytes"] is None  # CPU: no peak FLOP/s, no stats
    assert np.isfinite(r["loss_last"])


# tiny (2 layers, width 64, 320 padded byte-vocab rows): 320*64 + 64*64 + 2*(12*64^2 + 13*64) + 128
TINY_CONFIG_PARAMS = 320 * 64 + 64 * 64 + 2 * (12 * 64 * 64 + 13 * 64) + 2 * 64


def test_step_time_benchmark_smoke():
    r = _bench("step_time.py", "--batch_size=4", "--seq_len=16", "--config.model.scan_layers=True")
    _check_result(r, 4, 16, TINY_CONFIG_PARAMS)
    assert r["scan_layers"] is True and r["ms_per_step"] > 0


@pytest.mark.slow  # ~15 s quiet, ~40 s on a busy machine: imports torch and transformers too
def test_compare_torch_benchmark_smoke():
    r = _bench("compare_torch.py", "--batch_size=4", "--seq_len=16")
    for side in ("llmjax", "torch"):
        _check_result(r[side], 4, 16, TINY_CONFIG_PARAMS)
    assert r["ratio"] == pytest.approx(r["llmjax"]["tokens_per_sec"] / r["torch"]["tokens_per_sec"])
