"""The speedrun recipe at the size of configs/quickstart.py: same model size, data, batch and
steps; only the architecture, the optimizer and the schedule differ, so the two compare directly.

    python -m llmjax.prepare --source=builtin:pydocs --tokenizer=bytes --out=runs/demo/data
    python -m llmjax.main --config=configs/speedrun_tiny.py --workdir=runs/speedrun_tiny \
        --config.data.path=runs/demo/data

What to expect (benchmarks/speedrun.py, benchmarks/RESULTS.md; byte-level tiny Shakespeare at
context 128 and 32 sequences a step, CPU): GPT-2 + AdamW's 500-step validation loss (1.786) by
step ~142 (3.5x fewer tokens; mean of 3 seeds), 1.45 at step 500, at 1.14x the time per step.
Muon and rotary positions carry most of it. The logit soft-cap and the x0 shortcut
(modded-nanogpt's later records) are off: in the one-at-a-time ablation neither moved the loss
beyond run-to-run noise at this scale.
"""

import os

from llmjax.config import load


def get_config():
    c = load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.py"))
    # Architecture (modded-nanogpt / nanochat).
    c.model.position = "rope"
    c.model.norm = "rmsnorm"
    c.model.qk_norm = True
    c.model.mlp = "relu2"
    c.model.bias = False
    c.model.tie_embeddings = False
    c.model.zero_init_proj = True
    c.model.logit_cap = 0.0
    c.model.x0_mix = False
    # Optimizer: Muon for the blocks' matrices; AdamW (quickstart's rate) for the rest.
    c.optim.name = "muon"
    c.optim.muon_lr = 0.02
    c.optim.muon_momentum_warmup = 300  # 0.85 -> 0.95, as modded-nanogpt
    # Schedule: warm-up, stable, then linear decay over the last 40% (modded-nanogpt's cooldown).
    c.optim.schedule = "wsd"
    c.optim.decay_frac = 0.4
    return c
