"""Tiny GPT for tests: 2 layers, width 64, byte tokenizer; compiles and steps in seconds on CPU.

python -m llmjax.main --config=configs/tiny.py --workdir=/tmp/tiny --config.data.path=DATA
"""

from llmjax.config import base_config


def get_config():
    c = base_config()
    c.model.n_layer = 2  # two blocks: enough to exercise residual wiring and scaled init
    c.model.n_head = 4  # head size 16
    c.model.n_embd = 64
    c.model.block_size = 64
    c.data.tokenizer = "bytes"  # 257 ids, padded to 320
    c.data.batch_size = 8
    c.data.seq_len = 32
    c.optim.lr = 3e-3
    c.optim.min_lr = 3e-4
    c.optim.warmup_steps = 2
    c.train.steps = 20
    c.train.log_every = 5
    c.train.eval_every = 10
    c.train.eval_batches = 2
    c.train.ckpt_every = 10
    c.train.sample_every = 0  # sampling has its own tests
    c.train.sample_prompt = "The "
    c.train.sample_tokens = 16
    return c
