"""GPT-2 medium (354,823,168 parameters) on FineWeb-Edu: the 124M recipe scaled up.

    python -m llmjax.main --config=configs/gpt2_350m.py --workdir=runs/gpt2_350m \
        --config.data.path=data/fineweb_edu_10b --config.mesh.fsdp=-1 --config.mesh.data=1

What to expect: validation loss about 3.0 after 10B tokens (GPT-3 350M lr 3e-4).
Shard weights and optimizer state over all GPUs (mesh.fsdp=-1) and raise optim.grad_accum until a
micro-batch fits; the global batch stays 524,288 tokens.
"""

from llmjax.config import base_config


def get_config():
    c = base_config()  # the 124M FineWeb-Edu recipe: 524,288 tokens/step, 19,073 steps
    c.model.dtype = "bfloat16"  # bf16 matmuls; float32 master weights and optimizer state
    c.model.n_layer = 24  # OpenAI GPT-2 medium
    c.model.n_head = 16
    c.model.n_embd = 1024
    c.optim.lr = 3e-4  # larger models want a lower peak rate (GPT-3 table 2.1)
    c.optim.min_lr = 3e-4 / 10
    c.optim.grad_accum = 4  # micro-batches per step; lower it if memory allows
    return c
