"""GPT-2 124M on FineWeb-Edu sample-10BT: the llm.c / build-nanogpt recipe, 10B tokens.

    python -m llmjax.prepare --source=hf:HuggingFaceFW/fineweb-edu --hf_config=sample-10BT \
        --hf_split=train --workers=16 --out=data/fineweb_edu_10b
    python -m llmjax.main --config=configs/gpt2_124m.py --workdir=runs/gpt2_124m \
        --config.data.path=data/fineweb_edu_10b

What to expect: 19,073 steps of 524,288 tokens (one epoch of 10B tokens). llm.c reaches a validation
loss of about 3.29 on FineWeb (HellaSwag ~0.30, above OpenAI's GPT-2 124M at 0.294). On 8 GPUs use
the same command (the batch splits across them); on one GPU raise optim.grad_accum to fit memory.
"""

from llmjax.config import base_config


def get_config():
    c = base_config()
    # Model: OpenAI's GPT-2 small (12 layers, 12 heads, width 768, context 1024).
    c.model.n_layer = 12
    c.model.n_head = 12
    c.model.n_embd = 768
    c.model.block_size = 1024
    c.model.dtype = "bfloat16"  # bf16 matmuls; master weights and optimizer state stay float32
    c.data.tokenizer = "gpt2"
    c.data.batch_size = 512  # x 1024 tokens = 524,288 tokens per step (GPT-3 paper's 0.5M)
    c.data.seq_len = 1024
    c.optim.lr = 6e-4  # GPT-3 small's peak rate
    c.optim.min_lr = 6e-5  # cosine to 10% of peak
    c.optim.warmup_steps = 715  # 375M tokens of warmup, as in GPT-3
    c.optim.weight_decay = 0.1
    c.optim.grad_clip = 1.0
    c.optim.grad_accum = 1  # raise (2, 4, 8...) when 512 sequences do not fit the devices
    c.train.steps = 19073  # 10B tokens
    c.train.log_every = 10
    c.train.eval_every = 250
    c.train.eval_batches = 20  # 20 x 512 x 1024 = 10M validation tokens
    c.train.ckpt_every = 1000
    c.train.sample_every = 1000
    return c
