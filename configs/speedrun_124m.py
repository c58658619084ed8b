"""GPT-2 124M's size with the speedrun recipe (modded-nanogpt, nanochat): rotary positions,
parameter-free RMSNorm, QK-norm, ReLU^2, no biases, an untied zero-initialised head,
zero-initialised projections; Muon on the blocks' matrices, AdamW on the rest; warm-up/stable/decay
schedule.

    python -m llmjax.prepare --source=hf:HuggingFaceFW/fineweb-edu --hf_config=sample-10BT \
        --hf_split=train --workers=16 --out=data/fineweb_edu_10b
    python -m llmjax.main --config=configs/speedrun_124m.py --workdir=runs/speedrun_124m \
        --config.data.path=data/fineweb_edu_10b

What to expect, and from where: modded-nanogpt's record log reaches FineWeb val 3.28 (llm.c's GPT-2
124M after 10.26B tokens) in 5.0B tokens with tuned AdamW and rotary, 3.25B with Muon, 2.67B with
ReLU^2, QK-norm and zero-initialised projections, 2.40B with the untied zero-initialised head.
This config therefore runs 3B tokens (5,722 steps of 524,288), where GPT-2's recipe
(configs/gpt2_124m.py) runs 10B; those are other codebases' numbers on FineWeb, not measured here.
Measured here is the recipe at the tiny scale (benchmarks/speedrun.py, benchmarks/RESULTS.md),
where each change is ablated. Not exportable to Hugging Face (convert --to_hf refuses it);
sampling, chat, evaluate, HellaSwag and llmjax.plan work as for GPT-2.
"""

import os

from llmjax.config import load


def get_config():
    c = load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpt2_124m.py"))
    c.model.position = "rope"
    c.model.norm = "rmsnorm"
    c.model.qk_norm = True
    c.model.mlp = "relu2"
    c.model.bias = False
    c.model.tie_embeddings = False
    c.model.zero_init_proj = True
    c.optim.name = "muon"
    c.optim.muon_lr = 0.02  # Keller Jordan's Muon default at this width
    c.optim.muon_momentum_warmup = 300  # 0.85 -> 0.95 over the first 300 steps
    c.optim.lr = 3e-3  # AdamW for embeddings, head and scalars: modded-nanogpt runs these hotter
    c.optim.min_lr = 0.0
    c.optim.warmup_steps = 100
    c.optim.weight_decay = 0.0
    c.optim.schedule = "wsd"
    c.optim.decay_frac = 0.4
    c.train.steps = 5722  # 3.0B tokens at 524,288 per step
    return c
