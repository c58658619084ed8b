"""The speedrun recipe at the size of configs/quickstart.py: same model size, data, batch and
steps; only the architecture, the optimizer and the schedule differ, so the two compare directly.

    python -m llmjax.prepare --source=builtin:pydocs --tokenizer=bytes --out=runs/demo/data
    python -m llmjax.main --config=configs/speedrun_tiny.py --workdir=runs/speedrun_tiny \
        --config.data.path=runs/demo/data

What it buys at this size: benchmarks/speedrun.py and its section of benchmarks/RESULTS.md.
The logit soft-cap and the x0 shortcut (modded-nanogpt's later records) are off: the one-at-a-time
ablation that would decide them at this scale (`benchmarks/speedrun.py --ablation`) has not been
run yet on CPU.
"""

import importlib.util
import os


def quickstart_config():
    # Loaded by path, as config files are (configs/ is not a package).
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.py")
    spec = importlib.util.spec_from_file_location("quickstart", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def get_config():
    c = quickstart_config()
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
