import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llmjax.model import GPT
from llmjax.sample import generate, sample_logits
from tests.test_model import TINY


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, params, idx_BT):
    return nnx.merge(graphdef, params)(idx_BT)


@functools.partial(jax.jit, static_argnums=0)
def _cached(graphdef, params, idx_BT, cache, pos):
    return nnx.merge(graphdef, params).decode(idx_BT, cache, pos)


def _greedy_by_recompute(model, prompt, n):
    """Greedy decoding without a cache: the whole sequence is re-run for every token (padded to
    block_size on the right, which causal attention never sees, so one compile serves all)."""
    ids = list(prompt)
    for _ in range(n):
        padded = np.zeros((1, model.cfg.block_size), np.int32)
        padded[0, : len(ids)] = ids
        ids.append(int(jnp.argmax(_forward(*nnx.split(model), padded)[0, len(ids) - 1])))
    return ids[len(prompt) :]


def test_kv_cache_matches_full_recompute():
    """A multi-token prefill chunk, then one token at a time, for two rows at once: the logits at
    every step equal those of the full sequence run without a cache."""
    model = GPT(TINY, nnx.Rngs(2))
    graphdef, params = nnx.split(model)
    ids = np.random.default_rng(0).integers(0, 257, (2, 20))
    full = _forward(graphdef, params, ids)
    cache = model.init_cache(2, 32)
    logits, cache = _cached(graphdef, params, ids[:, :7], cache, 0)
    np.testing.assert_allclose(logits, full[:, :7], atol=1e-5)
    for pos in range(7, 20):
        logits, cache = _cached(graphdef, params, ids[:, pos : pos + 1], cache, pos)
        np.testing.assert_allclose(logits[:, 0], full[:, pos], atol=1e-5)


def test_greedy_generate_equals_recompute_with_mixed_lengths():
    model = GPT(TINY, nnx.Rngs(1))
    prompts = [[1, 2, 3], [7, 8, 9, 10, 11, 12]]
    out = generate(model, prompts, 6, temperature=0.0)
    for p, o in zip(prompts, out, strict=True):
        assert o == _greedy_by_recompute(model, p, 6)


def test_stops_at_eot():
    model = GPT(TINY, nnx.Rngs(1))
    first = _greedy_by_recompute(model, [1, 2, 3], 1)[0]
    out = generate(model, [[1, 2, 3]], 6, temperature=0.0, eot_id=first)
    assert out == [[first]]


def test_tokens_do_not_depend_on_chunk():
    """Each index samples with its own key, so tokens per dispatch change nothing. 4 + 28 tokens
    fill the context (and the cache) exactly: the last chunks run past its end and are discarded."""
    model = GPT(TINY, nnx.Rngs(4))
    prompts = [[5], [1, 2, 3, 4]]
    streamed: list[list[int]] = [[], []]
    outs = [
        generate(model, prompts, 28, temperature=1.0, top_k=20, seed=7, chunk=c) for c in (1, 8)
    ]
    outs.append(
        generate(
            model,
            prompts,
            28,
            temperature=1.0,
            top_k=20,
            seed=7,
            chunk=7,
            on_token=lambda r, t: streamed[r].append(t),
        )
    )
    assert outs[0] == outs[1] == outs[2] == streamed
    assert [len(o) for o in outs[0]] == [28, 28]
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        generate(model, prompts, 5, chunk=0)


def test_decode_compiles_once_per_cache_size(caplog):
    import logging

    model = GPT(TINY, nnx.Rngs(3))
    generate(model, [[1, 2, 3]], 12, temperature=0.8, top_k=10)
    # Other lengths, sampling settings and seeds inside the same 64-token cache reuse the steps.
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
        generate(model, [[4, 5, 6]], 20, temperature=0.0, seed=3)
        generate(model, [[9, 9, 9]], 5, temperature=1.3, top_p=0.9, seed=1)
    compiled = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Compiling")]
    assert not [m for m in compiled if "decode_chunk" in m or "prefill_step" in m], compiled


def test_sampling_distribution_and_padding():
    V, valid = 320, 257
    rng = np.random.default_rng(0)
    row = np.full(V, -1e9, np.float32)
    row[:valid] = rng.normal(0, 2, valid)
    logits = jnp.asarray(np.tile(row, (4000, 1)))
    key = jax.random.key(1)
    # top-k: the k largest, renormalised.
    draws = np.asarray(sample_logits(logits, key, 1.0, 4, 1.0))
    top4 = np.argsort(-row)[:4]
    p = np.exp(row[top4] - row[top4].max())
    p /= p.sum()
    assert set(draws) <= set(top4.tolist())
    np.testing.assert_allclose([np.mean(draws == t) for t in top4], p, atol=0.03)
    # top-p: the smallest set of most likely tokens reaching the mass, renormalised.
    probs = np.exp(row[:valid] - row[:valid].max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    nucleus = order[: np.searchsorted(np.cumsum(probs[order]), 0.6) + 1]
    draws = np.asarray(sample_logits(logits, key, 1.0, 0, 0.6))
    assert set(draws) <= set(nucleus.tolist())
    q = probs[nucleus] / probs[nucleus].sum()
    np.testing.assert_allclose([np.mean(draws == t) for t in nucleus], q, atol=0.03)
    # Never a padding id: not with a huge temperature, nor with k beyond the vocabulary.
    for temp, k, top_p in [(100.0, 0, 1.0), (100.0, 400, 1.0), (50.0, 300, 0.99999)]:
        draws = np.asarray(sample_logits(logits, key, temp, k, top_p))
        assert draws.max() < valid and len(set(draws)) > 100
    # temperature 0 is argmax whatever the filters say.
    assert set(np.asarray(sample_logits(logits[:3], key, 0.0, 4, 0.5))) == {int(row.argmax())}
