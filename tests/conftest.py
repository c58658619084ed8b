"""Shared fixtures: the repository's fixture files, a reference tiktoken, tiny prepared datasets.

Everything here is read from inside the repository (tests/fixtures, data/, the package's assets):
a clone with nothing beside it runs the suite."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The shard-verification cache (llmjax.integrity) of this session only, not the user's: the
# tests' own children inherit it.
os.environ.setdefault("LLMJAX_CACHE", tempfile.mkdtemp(prefix="llmjax-test-cache-"))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
# Example data a user runs the recipes with; the tests read the same copy.
INSTRUCTIONS = os.path.join(ROOT, "data", "instruction-data.json")
GPT2_BPE = os.path.join(ROOT, "llmjax", "assets", "gpt2")
GPT2_URLS = {
    "vocab.bpe": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "encoder.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
}


@pytest.fixture(scope="session")
def shakespeare() -> str:
    with open(os.path.join(FIXTURES, "tinyshakespeare_400k.txt"), encoding="utf-8") as f:
        return f.read()


@pytest.fixture(scope="session")
def reference_tiktoken(tmp_path_factory):
    """tiktoken's own `gpt2` encoding, built by tiktoken from its cache (no network): the BPE
    files the package ships (tiktoken checks their sha256) are placed where tiktoken would have
    cached its download."""
    import tiktoken

    cache = tmp_path_factory.mktemp("tiktoken_cache")
    for name, url in GPT2_URLS.items():
        shutil.copy(os.path.join(GPT2_BPE, name), cache / hashlib.sha1(url.encode()).hexdigest())
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    try:
        return tiktoken.get_encoding("gpt2")
    finally:
        if old is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = old


def write_docs(folder, text: str, n: int) -> str:
    """Splits `text` into `n` files (one document each); returns the glob matching them."""
    os.makedirs(folder, exist_ok=True)
    size = len(text) // n
    for i in range(n):
        with open(os.path.join(folder, f"doc{i:03d}.txt"), "w", encoding="utf-8") as f:
            f.write(text[i * size : (i + 1) * size])
    return os.path.join(folder, "*.txt")


@pytest.fixture(scope="session")
def byte_data(tmp_path_factory, shakespeare) -> str:
    """Tiny Shakespeare as 40 documents, byte-tokenized, 10% of documents in val."""
    from llmjax.prepare import prepare

    tmp = tmp_path_factory.mktemp("byte_data")
    pattern = write_docs(tmp / "docs", shakespeare[:400_000], 40)
    prepare(f"text:{pattern}", str(tmp / "shards"), tokenizer="bytes", val_fraction=0.1)
    return str(tmp / "shards")


@pytest.fixture(scope="session")
def pretrained_bytes(byte_data, tmp_path_factory) -> str:
    """A 2-step tiny pretrained workdir (bytes tokenizer, so it has no chat tokens), shared by
    the tests that only read it or point a command at it that must refuse before writing."""
    from llmjax import train

    work = str(tmp_path_factory.mktemp("pretrained_bytes") / "w")
    cfg = tiny_config(byte_data, **{"train.steps": 2, "train.eval_every": 0, "train.ckpt_every": 2})
    train.train_and_evaluate(cfg, work)
    return work


def pytest_runtest_setup(item) -> None:
    """What the `plan` marker promises (pyproject.toml): deviceless GPU compiles skip where jax's
    CUDA plugin is absent; and the `tpu` marker: deviceless TPU compiles where libtpu is."""
    if item.get_closest_marker("plan"):
        from llmjax import plan

        if not plan.cuda_plugin_available():
            pytest.skip("jax's CUDA plugin is not installed (make plan-install)")
    if item.get_closest_marker("tpu"):
        from llmjax import plan

        if not plan.libtpu_available():
            pytest.skip("libtpu (jax[tpu]) is not installed (make plan-install-tpu)")


def free_port() -> int:
    """A TCP port free on this host now (jax.distributed's coordinator, a tracker's server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_config(data_path: str, **overrides):
    from llmjax.config import load

    cfg = load(os.path.join(ROOT, "configs/tiny.py"))
    cfg.data.path = data_path
    for key, value in overrides.items():
        group, name = key.split(".")
        cfg[group][name] = value
    return cfg


def pretrain_run(cfg, devices=None):
    """`train.build` with the objective `main` gives a run on shards: the language-model loss."""
    from llmjax import batches, train

    return train.build(cfg, batches.objective(cfg, "pretrain"), devices)


def run_cli(
    module: str, *args: str, env: dict | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` from the repository root, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_main(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return run_cli("llmjax.main", *args, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=timeout)


def run_json(args: list[str], env: dict | None = None, timeout: float = 600) -> dict:
    """`python ARGS` from the repository root: the JSON object on the last line it prints (as every
    benchmark, llmjax.plan, llmjax.evaluate and the tests' multi-device children end), after
    checking it exited 0."""
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_plan(*args: str) -> dict:
    """`python -m llmjax.plan --gpu=h100 ARGS` (deviceless; needs the CUDA plugin, see the `plan`
    marker): its JSON report."""
    return run_json(["-m", "llmjax.plan", "--gpu=h100", *args])


def snapshot(folder) -> dict:
    """Every file below `folder` with its size and modification time: equal snapshots before and
    after a command mean it changed nothing on disk."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            p = os.path.join(dirpath, name)
            out[p] = (os.path.getsize(p), os.stat(p).st_mtime_ns)
    return out


@pytest.fixture(scope="session")
def env(tmp_path_factory) -> dict:
    """The environment of a CLI subprocess: CPU, this checkout's llmjax whatever the working
    directory, and one persistent compilation cache so repeated runs compile once."""
    cache = str(tmp_path_factory.mktemp("jax_cache"))
    return dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=cache,
        PYTHONPATH=ROOT,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
