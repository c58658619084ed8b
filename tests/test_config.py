import subprocess
import sys

import pytest

from llmjax.config import ConfigError, base_config, validate
from tests.conftest import ROOT, run_main


@pytest.mark.parametrize(
    "key,value,needle",
    [
        ("model.n_embd", 100, "model.n_embd=100 is not divisible by model.n_head=12"),
        ("data.seq_len", 2048, "data.seq_len=2048 exceeds model.block_size=1024"),
        ("model.dtype", "float8", "model.dtype='float8'"),
        ("model.remat", "all", "model.remat='all' is not one of none, dots_saveable, full"),
        ("data.tokenizer", "llama", "data.tokenizer='llama'"),
        ("optim.min_lr", 1.0, "optim.min_lr=1.0"),
        ("optim.grad_accum", 3, "not divisible by optim.grad_accum=3"),
        ("train.steps", 0, "train.steps=0 must be >= 1"),
        (
            "train.keep_every",
            1500,
            "train.keep_every=1500 is not a multiple of train.ckpt_every=1000",
        ),
        ("train.keep_every", -1000, "train.keep_every=-1000 must be >= 0"),
        ("train.spike_factor", 0.5, "train.spike_factor=0.5 must be 0"),
    ],
)
def test_validate_names_the_key(key, value, needle):
    cfg = base_config()
    group, name = key.split(".")
    cfg[group][name] = value
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        validate(cfg)


def test_base_config_is_valid():
    validate(base_config())


@pytest.mark.parametrize(
    "override,needle",
    [
        ("--config.train.stepz=5", "stepz"),
        ("--config.train.steps=abc", "steps"),
        ("--config.model.n_embd=66", "model.n_embd=66"),
    ],
)
def test_cli_errors_are_one_line_exit_2(tmp_path, override, needle):
    workdir = tmp_path / "w"
    proc = run_main("--config=configs/tiny.py", f"--workdir={workdir}", override, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert not workdir.exists()  # nothing written


def test_cli_missing_data_dir(tmp_path):
    proc = run_main(
        "--config=configs/tiny.py",
        f"--workdir={tmp_path / 'w'}",
        f"--config.data.path={tmp_path / 'nope'}",
        timeout=120,
    )
    assert proc.returncode == 2
    assert "no such directory" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "name,params",
    [
        ("gpt2_124m", 124_439_808),
        ("gpt2_350m", 354_823_168),
        ("gpt2_774m", 774_030_080),
        ("gpt2_1558m", 1_557_611_200),
        ("quickstart", None),
        ("tiny", None),
        ("sft_gpt2", 124_439_808 + 4 * 768),
    ],
)
def test_config_files_are_valid(name, params):
    import os

    from flax import nnx

    from llmjax.config import load
    from llmjax.model import GPT, count_params, model_config

    cfg = load(os.path.join(ROOT, f"configs/{name}.py"))
    validate(cfg)
    if params:
        model = nnx.eval_shape(lambda: GPT(model_config(cfg), nnx.Rngs(0)))
        assert count_params(model, padding=False) == params
    if name.startswith("gpt2_"):
        assert cfg.data.batch_size * cfg.data.seq_len == 524_288


def test_config_is_a_leaf_that_imports_no_jax():
    """Reading every config file (and checking one) starts neither jax nor a tokenizer nor a
    tracker: config.py imports no llmjax module but errors."""
    code = (
        "import glob, sys\n"
        "from llmjax.config import load, validate\n"
        "cfgs = [load(f) for f in sorted(glob.glob('configs/*.py'))]\n"
        "validate(cfgs[0])\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'jax', 'flax', 'optax', 'tiktoken', 'tensorboard', 'orbax', 'numpy'}))\n"
        "print(sorted(m for m in sys.modules if m.startswith('llmjax')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out == ["[]", "['llmjax', 'llmjax.config', 'llmjax.errors']"]


def test_vocab_sizes_and_choices_match_their_modules():
    from llmjax import config, model
    from llmjax.tokenizer import get_tokenizer

    assert {n: get_tokenizer(n).vocab_size for n in config.TOKENIZERS} == config.VOCAB_SIZES
    assert tuple(model.REMAT_POLICIES) == config.REMAT
