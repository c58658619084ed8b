import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmjax.model import GPT
from llmjax.sample import generate, sample_logits
from tests.test_model import TINY


def _greedy_by_recompute(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(jnp.argmax(model(jnp.asarray([ids]))[0, -1])))
    return ids[len(prompt):]


def test_kv_cache_matches_full_recompute():
    model = GPT(TINY, nnx.Rngs(0))
    prompt = [5, 17, 99, 3]
    cache = model.init_cache(1, 32)
    logits, cache = model.decode(jnp.asarray([prompt]), cache, 0)
    ids = list(prompt)
    for step in range(8):
        full = model(jnp.asarray([ids]))
        np.testing.assert_allclose(logits[0, -1], full[0, -1], atol=1e-5)
        nxt = int(jnp.argmax(full[0, -1]))
        ids.append(nxt)
        logits, cache = model.decode(jnp.asarray([[nxt]]), cache, len(ids) - 1)
        del step


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


def test_top_k_top_p_never_pick_excluded():
    logits = jnp.full((1, 320), -1e9).at[0, :257].set(jnp.linspace(0.0, 5.0, 257))
    keys = jax.random.split(jax.random.key(0), 400)
    k = np.array([int(sample_logits(logits, key, 1.0, 5, 1.0)[0]) for key in keys[:200]])
    assert set(k) <= set(range(252, 257)) and len(set(k)) > 1
    probs = jax.nn.softmax(logits[0, :257])
    order = np.argsort(-np.asarray(probs))
    nucleus = order[:np.searchsorted(np.cumsum(np.asarray(probs)[order]), 0.5) + 1]
    p = np.array([int(sample_logits(logits, key, 1.0, 0, 0.5)[0]) for key in keys[200:]])
    assert set(p) <= set(nucleus.tolist())
    assert (p < 257).all()
