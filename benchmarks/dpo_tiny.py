"""The whole chat recipe on a tiny model, on CPU: pretrain -> instruction finetuning -> DPO.

    python benchmarks/dpo_tiny.py [--out=runs/dpo_tiny] [--dpo_steps=150]

1. pretrains a tiny byte-level GPT (configs/tiny.py, context 256) on the Shakespeare fixture;
2. finetunes it on data/instruction-data.json (bytes-chat: the chat tokens added);
3. runs DPO from that on data/instruction-data-with-preference.json (10% of the prompts held out
   by hash), the same trainer, switched by the data.
Reports the held-out reward accuracy, margin and DPO loss of the finetuned model (before: the
policy is the reference, so accuracy 0.5 and margin 0 by construction) and after DPO, and greedy
answers to held-out prompts from both. Prints one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llmjax import chat, checkpoint, dpo, evaluate, train  # noqa: E402
from llmjax.config import base_config  # noqa: E402
from llmjax.instruct import is_held_out  # noqa: E402
from llmjax.prepare import prepare  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFS = os.path.join(ROOT, "data", "instruction-data-with-preference.json")
INSTRUCTIONS = os.path.join(ROOT, "data", "instruction-data.json")


def tiny(data_path: str, **overrides):
    c = base_config()
    c.model.n_layer, c.model.n_head, c.model.n_embd, c.model.block_size = 2, 4, 64, 256
    c.data.path, c.data.tokenizer, c.data.seq_len, c.data.batch_size = data_path, "bytes", 256, 16
    c.optim.warmup_steps = 10
    c.train.log_every, c.train.eval_every, c.train.sample_every = 25, 50, 0
    c.train.trackers = "none"
    for key, value in overrides.items():
        group, name = key.split(".")
        c[group][name] = value
    return c


def answers(workdir: str, prompts: list[str]) -> list[str]:
    model, tok, _ = checkpoint.load_model(workdir)
    kw = dict(max_new_tokens=120, temperature=0.0, top_k=0, top_p=1.0, seed=0, stream=False)
    return [chat.reply(model, tok, [{"role": "user", "content": p}], **kw)[0] for p in prompts]


def held_out(workdir: str, reference: str, beta: float) -> dict:
    model, tok, _ = checkpoint.load_model(workdir)
    ref_model = checkpoint.load_model(reference)[0]
    tokens = dpo.encode_split(tok, PREFS, 256)[0]["val"]
    return evaluate.preference_eval(model, tok, ref_model, tokens, beta=beta, batch=8)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="runs/dpo_tiny")
    p.add_argument("--pretrain_steps", type=int, default=300)
    p.add_argument("--sft_steps", type=int, default=300)
    p.add_argument("--dpo_steps", type=int, default=150)
    p.add_argument("--dpo_lr", type=float, default=1e-3)
    args = p.parse_args()
    out = os.path.abspath(args.out)
    shutil.rmtree(out, ignore_errors=True)
    times = {}

    t0 = time.time()
    with open(os.path.join(ROOT, "tests", "fixtures", "tinyshakespeare_400k.txt")) as f:
        text = f.read()
    os.makedirs(f"{out}/docs")
    for i in range(40):  # documents, so that the val split has some
        with open(f"{out}/docs/doc{i:02d}.txt", "w") as f:
            f.write(text[i * len(text) // 40 : (i + 1) * len(text) // 40])
    prepare(f"text:{out}/docs/*.txt", f"{out}/shards", tokenizer="bytes", val_fraction=0.1)
    common = {"optim.lr": 3e-3, "optim.min_lr": 3e-4}
    train.train_and_evaluate(
        tiny(f"{out}/shards", **common, **{"train.steps": args.pretrain_steps}), f"{out}/pretrain"
    )
    times["pretrain_s"] = time.time() - t0

    t0 = time.time()
    sft = tiny(
        INSTRUCTIONS,
        **common,
        **{
            "train.steps": args.sft_steps,
            "data.tokenizer": "bytes-chat",
            "model.init_from": f"{out}/pretrain",
        },
    )
    train.train_and_evaluate(sft, f"{out}/sft")
    times["sft_s"] = time.time() - t0

    t0 = time.time()
    beta = 0.1
    cfg = tiny(
        PREFS,
        **{
            "train.steps": args.dpo_steps,
            "data.tokenizer": "bytes-chat",
            "data.batch_size": 8,
            "model.init_from": f"{out}/sft",
            "optim.lr": args.dpo_lr,
            "optim.min_lr": args.dpo_lr / 10,
            "optim.dpo_beta": beta,
        },
    )
    train.train_and_evaluate(cfg, f"{out}/dpo")
    times["dpo_s"] = time.time() - t0

    pairs = dpo.load_pairs(PREFS)
    prompts = [pr[0]["content"] for pr, _, _ in pairs if is_held_out(pr, dpo.VAL_FRACTION)][:4]
    report = {
        "before": held_out(f"{out}/sft", f"{out}/sft", beta),
        "after": held_out(f"{out}/dpo", f"{out}/sft", beta),
        "answers": [
            {"prompt": q, "before": a, "after": b}
            for q, a, b in zip(
                prompts, answers(f"{out}/sft", prompts), answers(f"{out}/dpo", prompts), strict=True
            )
        ],
        "times": times,
        "args": vars(args),
    }
    with open(f"{out}/dpo/metrics.jsonl") as f:
        report["dpo_eval_log"] = [
            {k: v for k, v in json.loads(line).items() if k.startswith(("step", "eval/"))}
            for line in f
            if "eval/reward_acc" in line
        ]
    print(json.dumps(report))


if __name__ == "__main__":
    main()
