import jax
import numpy as np
from flax import nnx

from llmjax.config import base_config
from llmjax.model import GPT
from llmjax.optim import decay_mask, lr_schedule, make_optimizer
from tests.test_model import TINY


def _cfg(**kw):
    # The optimizer section of the real default config, so every key optim.py reads exists.
    c = base_config().optim
    c.update({**dict(lr=6e-4, min_lr=6e-5, warmup_steps=10, weight_decay=0.1), **kw})
    return c


def test_schedule_values():
    s = lr_schedule(_cfg(), 110)
    assert float(s(0)) == 0.0
    np.testing.assert_allclose(float(s(5)), 3e-4, rtol=1e-6)  # half way through warmup
    np.testing.assert_allclose(float(s(10)), 6e-4, rtol=1e-6)  # peak
    # Half way through the cosine: min + (max - min) / 2.
    np.testing.assert_allclose(float(s(60)), 6e-5 + (6e-4 - 6e-5) / 2, rtol=1e-5)
    np.testing.assert_allclose(float(s(110)), 6e-5, rtol=1e-5)


def test_decay_mask_only_weights():
    params = nnx.to_pure_dict(nnx.state(GPT(TINY, nnx.Rngs(0)), nnx.Param))
    mask = decay_mask(params)
    flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(mask)}
    decayed = sorted(k for k, v in flat.items() if v)
    assert "['wte']['embedding']" in decayed and "['wpe']['embedding']" in decayed
    assert "['h'][0]['attn']['c_attn']['kernel']" in decayed
    assert not flat["['h'][0]['attn']['c_attn']['bias']"]  # 2-D, but a bias
    assert not flat["['ln_f']['scale']"]
    assert len(decayed) == 2 + 4 * TINY.n_layer


def test_weight_decay_and_clipping_math():
    # One AdamW step on a zero gradient moves a decayed weight by exactly -lr * wd * w.
    cfg = _cfg(warmup_steps=0, lr=0.1, min_lr=0.1)
    tx = make_optimizer(cfg, 10)
    params = {"k": {"kernel": np.ones((2, 2), np.float32)}, "b": {"bias": np.ones(2, np.float32)}}
    grads = jax.tree.map(np.zeros_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["k"]["kernel"], -0.1 * 0.1 * 1.0, rtol=1e-6)
    np.testing.assert_allclose(updates["b"]["bias"], 0.0)
