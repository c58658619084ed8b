"""OpenAI GPT-2 weights in and out: Hugging Face format <-> llmjax checkpoints.

    python -m llmjax.convert --from_hf=gpt2 --workdir=runs/gpt2      # hub id or local HF directory
    python -m llmjax.convert --workdir=runs/gpt2 --to_hf=out/gpt2    # any llmjax checkpoint

The format itself (names, layouts, config.json, safetensors and pickles) is hf_gpt2.py.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from absl import flags
from flax import nnx

from llmjax import checkpoint, errors, workdir_lock
from llmjax.config import base_config
from llmjax.hf_gpt2 import TOKENIZER_FOR_VOCAB, ConvertError, from_hf, to_hf
from llmjax.init_from import is_workdir
from llmjax.model import GPT

# ---------------------------------------------------------------------------------------------
# llmjax checkpoints


def write_workdir(model: GPT, workdir: str, source: str) -> None:
    """Writes `model` as step 0 of an llmjax workdir that sample, evaluate and init_from read."""
    tokenizer = TOKENIZER_FOR_VOCAB.get(model.cfg.valid_vocab_size)
    if tokenizer is None:
        known = ", ".join(f"{t}: {v}" for v, t in TOKENIZER_FOR_VOCAB.items())
        raise ConvertError(
            f"{source}: vocab_size={model.cfg.valid_vocab_size} matches no llmjax "
            f"tokenizer ({known})"
        )
    mngr = checkpoint.manager(workdir, keep=1)
    if mngr.latest_step() is not None:
        raise ConvertError(f"--workdir={workdir} already holds checkpoints; choose a new folder")
    cfg = base_config()
    m = model.cfg
    cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd = m.n_layer, m.n_head, m.n_embd
    cfg.model.block_size, cfg.model.vocab_size = m.block_size, m.vocab_size
    cfg.data.tokenizer = tokenizer
    cfg.data.seq_len = min(cfg.data.seq_len, m.block_size)
    record = checkpoint.Record(
        step=0,
        config=cfg.to_dict(),
        model=dataclasses.asdict(m),
        kind="pretrain",
        tokens_per_step=cfg.data.batch_size * cfg.data.seq_len,
        converted_from=source,
    )
    # Weights only: training from them starts a fresh run (model.init_from=WORKDIR).
    state = {
        "step": jnp.zeros((), jnp.int32),
        "params": nnx.to_pure_dict(nnx.state(model, nnx.Param)),
    }
    checkpoint.save(mngr, 0, state, record)
    mngr.wait_until_finished()
    mngr.close()


# ---------------------------------------------------------------------------------------------
# CLI

FLAGS = flags.FLAGS


def main(argv) -> None:
    del argv
    if FLAGS.from_hf and FLAGS.to_hf:
        raise ConvertError("give --from_hf (import) or --to_hf (export), not both")
    if FLAGS.from_hf:
        model = from_hf(FLAGS.from_hf)
        lock = workdir_lock.acquire(FLAGS.workdir)  # not into a workdir a trainer is using
        try:
            write_workdir(model, FLAGS.workdir, FLAGS.from_hf)
        finally:
            lock.release()
        print(
            f"convert: {FLAGS.from_hf} -> {FLAGS.workdir} ({model.cfg.n_layer} layers, "
            f"width {model.cfg.n_embd})"
        )
    elif FLAGS.to_hf:
        if not is_workdir(FLAGS.workdir):
            raise ConvertError(f"--workdir={FLAGS.workdir}: no checkpoints folder")
        model, _, step = checkpoint.load_model(FLAGS.workdir)
        to_hf(model, FLAGS.to_hf)
        print(f"convert: {FLAGS.workdir} (step {step}) -> {FLAGS.to_hf}")
    else:
        raise ConvertError("give --from_hf=SRC (with --workdir) or --to_hf=OUT")


def _define_flags() -> None:
    flags.DEFINE_string("from_hf", None, "hub id (gpt2, gpt2-medium, ...) or local HF directory")
    flags.DEFINE_string("to_hf", None, "output directory for a Hugging Face GPT-2 export")
    flags.DEFINE_string(
        "workdir", None, "llmjax workdir: written by --from_hf, read by --to_hf", required=True
    )


if __name__ == "__main__":
    _define_flags()
    errors.run(main)
