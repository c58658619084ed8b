"""nanoGPT's own CPU recipe ("I only have a macbook", config/train_shakespeare_char.py with its
README's overrides): character-level tiny Shakespeare, 4 layers x 4 heads x 128 wide, context 64,
batch 12, 2,000 steps, lr 1e-3 -> 1e-4 cosine after 100 warm-up steps, beta2 0.99, no dropout,
no biases. Bytes stand in for nanoGPT's 65 characters (tiny Shakespeare is ASCII: one byte, one
character), so the losses compare directly.

    python benchmarks/nanogpt_recipe.py                 # prepares the data, trains, evaluates
    python benchmarks/nanogpt_recipe.py --steps=200     # a short timing run
    # or by hand, on data split as nanoGPT splits it (first 90% train, last 10% val):
    python benchmarks/nanogpt_recipe.py --prepare_only --out=runs/shakespeare_char/data
    python -m llmjax.main --config=configs/nanogpt_cpu.py --workdir=runs/shakespeare_char \
        --config.data.path=runs/shakespeare_char/data

Expected: validation loss 1.88 over the whole val split after 2,000 steps with the full tiny
Shakespeare (1,115,394 characters, `--text=input.txt`; nanoGPT's README reports 1.88, and its
train.py gave 1.892 on this machine, issue 28). On the repository's fixture (its first 400,000
characters, what `benchmarks/nanogpt_recipe.py` reads by default) the val split is other text:
measured 1.789 (train loss 1.687 at step 2,000; benchmarks/RESULTS.md).
"""

from llmjax.config import base_config


def get_config():
    c = base_config()
    c.model.n_layer = 4
    c.model.n_head = 4
    c.model.n_embd = 128
    c.model.block_size = 64  # nanoGPT's block_size: the context is also the longest position
    c.model.bias = False  # nanoGPT's default (bias=False in its train.py)
    c.data.tokenizer = "bytes"  # 257 ids padded to 320; nanoGPT's 65 characters are a subset
    c.data.batch_size = 12
    c.data.seq_len = 64
    c.optim.lr = 1e-3  # "with baby networks can afford to go a bit higher" (nanoGPT)
    c.optim.min_lr = 1e-4  # lr / 10, nanoGPT's rule
    c.optim.warmup_steps = 100
    c.optim.weight_decay = 0.1  # nanoGPT's default, on matrices only (as here: optim.DECAYED)
    c.optim.b2 = 0.99  # "make a bit bigger because number of tokens per iter is small"
    c.optim.grad_clip = 1.0
    c.train.steps = 2000  # nanoGPT's max_iters = lr_decay_iters
    c.train.log_every = 100
    c.train.eval_every = 250  # nanoGPT's eval_interval
    c.train.eval_batches = 20  # nanoGPT's eval_iters on the macbook
    c.train.ckpt_every = 2000
    c.train.sample_every = 0
    c.train.sample_prompt = "ROMEO:"
    c.train.sample_tokens = 200
    return c
