"""Preference finetuning (DPO) of an instruction-finetuned GPT-2 on the 1,094 pairs in data/.

    python -m llmjax.main --config=configs/sft_gpt2.py --workdir=runs/sft \
        --config.data.path=data/instruction-data.json
    python -m llmjax.main --config=configs/dpo_gpt2.py --workdir=runs/dpo \
        --config.model.init_from=runs/sft \
        --config.data.path=data/instruction-data-with-preference.json
    python -m llmjax.evaluate --workdir=runs/dpo \
        --data=data/instruction-data-with-preference.json
    python -m llmjax.chat --workdir=runs/dpo

A data.path of {instruction, input, chosen, rejected} (or {prompt|messages, chosen, rejected})
records switches the trainer to DPO; model.init_from must be an instruction-finetuned workdir
(chat tokens): it is the starting point and the frozen reference, whose log-probabilities of
every answer are computed once before step 1 and cached in WORKDIR/dpo_reference.npz. The shape
and tokenizer come from init_from. Pairs are split by a hash of the prompt (10% held out).

What to expect: the loss starts at log 2 = 0.693 with reward accuracy 0.5 and margin 0 (policy =
reference); the held-out reward accuracy (eval/reward_acc, logged every eval_every steps with the
rewards and the margin) rises as the margin grows, while chat answers stay on topic. The rejected
answers of this set are mostly rude or padded variants of the chosen ones, so accuracy rises fast;
benchmarks/RESULTS.md has the CPU measurement of the whole recipe on a tiny model.
"""

from llmjax.config import base_config


def get_config():
    c = base_config()
    c.model.init_from = "runs/sft"  # an instruction-finetuned workdir: the start and the reference
    c.model.dtype = "bfloat16"
    c.model.dropout = 0.0  # the policy and the reference score the same answers alike at step 0
    c.data.path = "data/instruction-data-with-preference.json"
    c.data.tokenizer = "gpt2-chat"  # the family comes from init_from; the chat tokens stay
    c.data.batch_size = 8  # pairs per step (16 sequences)
    c.data.seq_len = 512  # longer pairs are truncated (the count is printed)
    c.optim.dpo_beta = 0.1  # implicit reward scale
    c.optim.dpo_label_smoothing = 0.0  # > 0: conservative DPO
    c.optim.lr = 5e-6  # DPO moves the model far less than finetuning does
    c.optim.min_lr = 5e-7
    c.optim.warmup_steps = 10
    c.optim.weight_decay = 0.01
    c.train.steps = 250  # ~2 epochs of ~985 training pairs
    c.train.log_every = 10
    c.train.eval_every = 50  # every held-out pair: loss, reward accuracy, rewards, margin
    c.train.ckpt_every = 125
    c.train.sample_every = 125  # answers to instruct.SAMPLE_QUESTIONS, logged as text
    c.train.sample_tokens = 64
    return c
