"""Instruction finetuning of OpenAI's GPT-2 124M on the 1,100 Alpaca-style examples.

    python -m llmjax.main --config=configs/sft_gpt2.py --workdir=runs/sft \
        --config.data.path=data/instruction-data.json
    python -m llmjax.chat --workdir=runs/sft

model.init_from takes a hub id (gpt2, gpt2-medium, ...), a local Hugging Face directory, or an
llmjax workdir. The chat tokens (<|user|>, <|assistant|>, <|end|>, <|system|>) are new embedding
rows, started at the mean of the pretrained rows. Loss counts assistant tokens only; examples are
padded, one per row. Expect the validation loss to fall from ~2.5 to ~1.3 within two epochs
(about 250 steps) and short, on-topic answers; GPT-2 124M knows little, so facts may be wrong.
"""

from llmjax.config import base_config


def get_config():
    c = base_config()
    c.model.init_from = "gpt2"  # pretrained weights to start from
    c.model.dtype = "bfloat16"
    c.model.dropout = 0.0
    c.data.path = "data/instruction-data.json"  # an Alpaca or messages JSON/JSONL file
    c.data.tokenizer = "gpt2-chat"  # GPT-2 BPE plus the four chat tokens (stored with the run)
    c.data.batch_size = 8
    c.data.seq_len = 512  # longer examples are truncated (the count is printed)
    c.optim.lr = 5e-5  # finetuning: 10x below pretraining
    c.optim.min_lr = 5e-6
    c.optim.warmup_steps = 20
    c.optim.weight_decay = 0.1
    c.train.steps = 250  # ~2 epochs of 1,045 training examples
    c.train.log_every = 10
    c.train.eval_every = 50
    # train.eval_batches is not used: finetuning evaluates every held-out example.
    c.train.ckpt_every = 125
    c.train.sample_every = 125  # answers to instruct.SAMPLE_QUESTIONS, logged as text
    c.train.sample_tokens = 64
    return c
