"""`make demo`: a 4-layer byte-level GPT on Python's own documentation, ~3 minutes on 2 CPU cores.

    make demo
    # or by hand:
    python -m llmjax.prepare --source=builtin:pydocs --tokenizer=bytes --out=runs/demo/data
    python -m llmjax.main --config=configs/quickstart.py --workdir=runs/demo \
        --config.data.path=runs/demo/data

Expect the training loss to fall from ~5.6 (ln 257, uniform over bytes) to about 1.9 and samples
that start to look like Python documentation: real words, then byte soup as the model loses its way.
"""

from llmjax.config import base_config


def get_config():
    c = base_config()
    c.model.n_layer = 4
    c.model.n_head = 4
    c.model.n_embd = 128
    c.model.block_size = 128
    c.data.tokenizer = "bytes"  # a tiny vocabulary learns visibly in minutes on CPU
    c.data.batch_size = 8  # small batches, many steps: per token, the fastest learning on CPU
    c.data.seq_len = 128  # = block_size, so samples of 100+ bytes stay on trained positions
    c.optim.lr = 2e-3  # small models tolerate a high peak rate
    c.optim.min_lr = 2e-4
    c.optim.warmup_steps = 100
    c.optim.weight_decay = 0.1
    c.train.steps = 1200  # 1.2M tokens, about one pass over the corpus
    c.train.log_every = 100
    c.train.eval_every = 400
    c.train.eval_batches = 16
    c.train.ckpt_every = 400
    c.train.sample_every = 600
    c.train.sample_prompt = "The built-in function"
    c.train.sample_tokens = 96
    return c
