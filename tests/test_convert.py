"""GPT-2 weights in and out, checked against transformers' PyTorch GPT2LMHeadModel (CPU, float32).

Every checkpoint is built here with random weights (no download). All parameters, biases and
LayerNorms included, are drawn at random so that a swapped or mis-reshaped tensor cannot hide
behind GPT-2's zero/one initialisation.
"""

import dataclasses
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

from llmjax import checkpoint, hf_gpt2, train, workdir_lock
from llmjax.hf_gpt2 import ConvertError
from llmjax.model import GPT
from llmjax.sample import generate
from tests.conftest import ROOT, pretrain_run, run_main, tiny_config


def hf_model(n_layer=2, n_head=4, n_embd=64, vocab=257, n_positions=64, std=0.05, seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        vocab_size=vocab,
        n_positions=n_positions,
        bos_token_id=vocab - 1,
        eos_token_id=vocab - 1,
    )
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model


def state_dict(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def hf_logits(model, idx: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(idx)).logits.numpy()


def ours_logits(model, idx: np.ndarray) -> np.ndarray:
    return np.asarray(model(jnp.asarray(idx)))[..., : model.cfg.valid_vocab_size]


def test_logits_match_transformers(tmp_path):
    # Other shapes: 124M below, (2, 4, 64) in the CLI test, (2, 2, 32) in the key-layout test.
    shape = dict(n_layer=3, n_head=3, n_embd=96, vocab=50257, n_positions=128)
    hf = hf_model(**shape)
    hf.save_pretrained(tmp_path)  # safetensors with the `transformer.` prefix
    model = hf_gpt2.from_hf(str(tmp_path))
    assert model.cfg.vocab_size % 64 == 0 and model.cfg.valid_vocab_size == shape["vocab"]
    idx = np.random.default_rng(0).integers(0, shape["vocab"], (2, shape["n_positions"]))
    np.testing.assert_allclose(ours_logits(model, idx), hf_logits(hf, idx), atol=1e-4, rtol=0)
    # Padded rows exist but can never be produced.
    assert np.all(np.asarray(model(jnp.asarray(idx[:, :4])))[..., shape["vocab"] :] <= -1e8)


def test_logits_match_transformers_124m():
    hf = hf_model(n_layer=12, n_head=12, n_embd=768, vocab=50257, n_positions=1024, std=0.02)
    model = hf_gpt2.from_state_dict(hf.config.to_dict(), state_dict(hf))
    assert model.cfg.vocab_size == 50304
    idx = np.random.default_rng(1).integers(0, 50257, (1, 64))
    np.testing.assert_allclose(ours_logits(model, idx), hf_logits(hf, idx), atol=1e-4, rtol=0)


def test_greedy_generation_matches_transformers_generate():
    # With this seed the top-2 logit gap stays above 5e-4 at every step (logits agree to ~1e-5),
    # so near-ties cannot decide the comparison, and the continuation is not one repeated token.
    hf = hf_model(n_layer=2, n_head=4, n_embd=64, vocab=50257, n_positions=64, std=0.05, seed=3)
    model = hf_gpt2.from_state_dict(hf.config.to_dict(), state_dict(hf))
    prompt = [15496, 11, 314, 1101, 257, 3303, 2746, 11]
    ours = generate(model, [prompt], 32, temperature=0.0)[0]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=32,
            min_new_tokens=32,
            do_sample=False,
            pad_token_id=0,
        )
    assert ours == out[0, len(prompt) :].tolist()
    assert len(set(ours)) > 4  # a real continuation, not one token repeated


def test_key_layouts_and_round_trip(tmp_path):
    hf = hf_model(n_layer=2, n_head=2, n_embd=32, vocab=257, n_positions=32)
    hf_cfg = hf.config.to_dict()
    sd = state_dict(hf)
    reference = hf_gpt2.normalize_keys(sd)
    assert set(reference) == set(hf_gpt2.param_mapping(hf_gpt2.config_from_hf(hf_cfg)))

    # OpenAI-style file on the hub: no prefix, causal-mask buffers, no lm_head.
    bare = {k.removeprefix("transformer."): v for k, v in sd.items() if k != "lm_head.weight"}
    for i in range(2):
        bare[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 32, 32), np.float32))
        bare[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    (tmp_path / "bare").mkdir()
    save_file(bare, tmp_path / "bare" / "model.safetensors")
    # transformers-style PyTorch pickle: prefix and the tied lm_head.weight.
    (tmp_path / "pt").mkdir()
    with_head = {
        **{f"transformer.{k}": v for k, v in reference.items()},
        "lm_head.weight": reference["wte.weight"],
    }
    torch.save(
        {k: torch.tensor(v) for k, v in with_head.items()}, tmp_path / "pt" / "pytorch_model.bin"
    )
    for d in ("bare", "pt"):
        (tmp_path / d / "config.json").write_text(json.dumps(hf_cfg))
        model = hf_gpt2.from_hf(str(tmp_path / d))
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        back = hf_gpt2.params_to_hf(params, model.cfg)
        assert set(back) == set(reference)
        for k, v in reference.items():  # HF -> llmjax -> HF: identical tensors
            np.testing.assert_array_equal(back[k], v, err_msg=k)

    # Export: padding removed, transformers loads it with identical logits.
    hf_gpt2.to_hf(model, str(tmp_path / "out"))
    exported = load_file(tmp_path / "out" / "model.safetensors")
    assert exported["transformer.wte.weight"].shape == (257, 32)
    for k, v in reference.items():
        np.testing.assert_array_equal(exported[f"transformer.{k}"], v, err_msg=k)
    again = GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    idx = np.random.default_rng(2).integers(0, 257, (2, 32))
    np.testing.assert_array_equal(hf_logits(again, idx), hf_logits(hf, idx))
    with pytest.raises(ConvertError, match="already holds"):
        hf_gpt2.to_hf(model, str(tmp_path / "out"))  # never overwrites


class _NotATensor:
    pass


def test_mismatches_and_unsafe_pickles_are_refused(tmp_path):
    hf = hf_model(n_layer=2, n_head=2, n_embd=32, vocab=257, n_positions=32)
    cfg = hf_gpt2.config_from_hf(hf.config.to_dict())
    sd = hf_gpt2.normalize_keys(state_dict(hf))
    bad = dict(sd)
    del bad["h.1.mlp.c_fc.bias"]
    bad["h.0.attn.c_proj.weight"] = np.zeros((32, 31), np.float32)
    bad["h.2.ln_1.weight"] = np.zeros(32, np.float32)
    with pytest.raises(ConvertError) as e:
        hf_gpt2.hf_to_params(bad, cfg, "bad.safetensors")
    msg = str(e.value)
    assert "missing keys: h.1.mlp.c_fc.bias" in msg and "unexpected keys: h.2.ln_1.weight" in msg
    assert "h.0.attn.c_proj.weight (32, 31) != (32, 32)" in msg and "bad.safetensors" in msg
    untied = {**sd, "lm_head.weight": sd["wte.weight"] + 1}
    with pytest.raises(ConvertError, match="lm_head.weight differs"):
        hf_gpt2.hf_to_params(untied, cfg)
    with pytest.raises(ConvertError, match="activation_function='relu'"):
        hf_gpt2.config_from_hf({**hf.config.to_dict(), "activation_function": "relu"})

    (tmp_path / "config.json").write_text(json.dumps(hf.config.to_dict()))
    torch.save(
        {"wte.weight": torch.zeros(2), "evil": _NotATensor()}, tmp_path / "pytorch_model.bin"
    )
    with pytest.raises(ConvertError, match="weights_only=True"):
        hf_gpt2.from_hf(str(tmp_path))
    with pytest.raises(ConvertError, match="not a directory"):
        hf_gpt2.from_hf(str(tmp_path / "missing"))


def _fake_hub_cache(cache, repo: str, model) -> None:
    """The layout huggingface_hub leaves in its cache after downloading `repo`."""
    commit = "0" * 40
    base = cache / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    model.save_pretrained(base / "snapshots" / commit)


def test_hub_id_goes_through_huggingface_hub(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    hf = hf_model(n_layer=2, n_head=2, n_embd=32, vocab=257, n_positions=32)
    _fake_hub_cache(tmp_path, "gpt2", hf)
    model = hf_gpt2.from_hf("gpt2")
    idx = np.arange(20)[None] % 257
    np.testing.assert_allclose(ours_logits(model, idx), hf_logits(hf, idx), atol=1e-5)
    with pytest.raises(ConvertError, match="cannot fetch 'gpt2-medium'.*local directory"):
        hf_gpt2.from_hf("gpt2-medium")


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_import_export_and_init_from(tmp_path, byte_data):
    hf = hf_model(n_layer=2, n_head=4, n_embd=64, vocab=257, n_positions=64)
    hf.save_pretrained(tmp_path / "hf")
    work = str(tmp_path / "work")
    r = _run("llmjax.convert", f"--from_hf={tmp_path / 'hf'}", f"--workdir={work}")
    assert r.returncode == 0, r.stderr
    model, tok, step = checkpoint.load_model(work)
    assert (tok.name, step) == ("bytes", 0)
    idx = np.random.default_rng(3).integers(0, 257, (1, 64))
    np.testing.assert_allclose(ours_logits(model, idx), hf_logits(hf, idx), atol=1e-4, rtol=0)

    r = _run("llmjax.convert", f"--workdir={work}", f"--to_hf={tmp_path / 'out'}")
    assert r.returncode == 0, r.stderr
    again = GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    np.testing.assert_array_equal(hf_logits(again, idx), hf_logits(hf, idx))
    r = _run("llmjax.convert", f"--from_hf={tmp_path / 'nowhere'}", f"--workdir={work}")
    assert r.returncode == 2 and r.stderr.startswith("llmjax: ") and "nowhere" in r.stderr
    held = workdir_lock.acquire(str(tmp_path / "busy"))  # a trainer's workdir: not written into
    try:
        r = _run("llmjax.convert", f"--from_hf={tmp_path / 'hf'}", f"--workdir={tmp_path / 'busy'}")
    finally:
        held.release()
    assert r.returncode == 2 and f"pid {os.getpid()} since" in r.stderr, r.stderr
    assert os.listdir(tmp_path / "busy") == []

    # model.init_from: a workdir or an HF directory gives the same step-0 params; the context is
    # cropped to the configured block_size (tiny: 64 -> 32 after the override).
    for src in (work, str(tmp_path / "hf")):
        cfg = tiny_config(byte_data, **{"model.init_from": src, "model.block_size": 32})
        run = pretrain_run(cfg)
        state = train.initial_state(run)
        got = hf_gpt2.params_to_hf(state.params, run.model_cfg)
        ref = hf_gpt2.normalize_keys(state_dict(hf))
        np.testing.assert_array_equal(got["wpe.weight"], ref["wpe.weight"][:32])
        np.testing.assert_array_equal(got["h.1.attn.c_attn.weight"], ref["h.1.attn.c_attn.weight"])
        assert int(state.step) == 0
    cfg = tiny_config(byte_data, **{"model.init_from": work, "model.n_layer": 3})
    with pytest.raises(ConvertError, match="n_layer 2 != model.n_layer 3"):
        train.initial_state(pretrain_run(cfg))
    # Training directly in the converted workdir is refused with the way to do it.
    r = run_main(
        "--config=configs/tiny.py",
        f"--workdir={work}",
        f"--config.data.path={byte_data}",
        "--config.model.block_size=64",
    )
    assert r.returncode == 2 and f"--config.model.init_from={work}" in r.stderr.splitlines()[-1]


def test_scanned_layout_imports_and_exports(tmp_path):
    hf = hf_model(n_layer=3, n_head=4, n_embd=64, vocab=257, n_positions=64)
    sd = state_dict(hf)
    flat = hf_gpt2.from_state_dict(hf.config.to_dict(), sd, "test")
    cfg = dataclasses.replace(flat.cfg, scan_layers=True)
    params = hf_gpt2.hf_to_params(sd, cfg, "test")
    assert params["h"]["attn"]["c_attn"]["kernel"].shape == (3, 64, 3, 64)  # [L, D, 3, D]
    back = hf_gpt2.params_to_hf(params, cfg)
    for k, v in hf_gpt2.normalize_keys(sd).items():
        if not k.endswith((".attn.bias", ".attn.masked_bias")):
            np.testing.assert_array_equal(back[k], v)
    scanned = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: GPT(cfg, nnx.Rngs(0)))), params)
    idx = np.random.default_rng(0).integers(0, 257, (1, 16))
    np.testing.assert_allclose(ours_logits(scanned, idx), hf_logits(hf, idx), atol=1e-4, rtol=0)


def test_init_from_sets_the_architecture(tmp_path, byte_data):
    """configs/sft_gpt2.py (GPT-2 124M's shape, gpt2-chat, seq_len 512) finetunes a 2-layer,
    64-wide, 64-token bytes model given only init_from and the data: the shape, the tokenizer
    family and the context come from the source."""
    src = str(tmp_path / "pretrained")
    cfg = tiny_config(byte_data, **{"train.steps": 2, "train.eval_every": 0, "train.ckpt_every": 2})
    train.train_and_evaluate(cfg, src)
    sft = tmp_path / "sft"
    common = [
        "--config=configs/sft_gpt2.py",
        f"--workdir={sft}",
        f"--config.model.init_from={src}",
        f"--config.data.path={ROOT}/data/instruction-data.json",
    ]
    r = run_main(*common, "--config.model.n_layer=12")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert f"--config.model.n_layer=12 contradicts model.init_from={src}" in lines[0]
    assert not sft.exists()

    r = run_main(*common, "--config.train.steps=3")  # 3 steps: this checks wiring, not learning
    assert r.returncode == 0, r.stderr[-3000:]
    assert (
        f"model.init_from={src}: 2 layers, 4 heads, width 64, context 64 (source 64), "
        "tokenizer bytes-chat, data.seq_len 64"
    ) in r.stdout
    model, tok, step = checkpoint.load_model(str(sft))
    assert (model.cfg.n_layer, model.cfg.n_embd, model.cfg.block_size) == (2, 64, 64)
    assert (tok.name, step) == ("bytes-chat", 3)
