"""Requests per second of llmjax.harness's LlmjaxLM against the harness's own `hf` backend (HFLM),
on the same GPT-2 124M-shaped model (random init, float32) and the same multiple-choice task, on
CPU. Each backend runs simple_evaluate once from a cold start: compile time included.

    JAX_PLATFORMS=cpu python benchmarks/harness_speed.py [--docs=250] [--batch_size=16]

The task: `docs` documents of 4 choices (a line of Tiny Shakespeare as the context, the next
lines' openings as the choices), so 4 x docs loglikelihood requests. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import jax
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from llmjax import convert, harness, hf_gpt2  # noqa: E402
from llmjax.model import GPT, GPTConfig  # noqa: E402

TASK = """task: speed_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def write_task(folder: str, docs: int) -> None:
    with open(os.path.join(ROOT, "tests", "fixtures", "tinyshakespeare_400k.txt")) as f:
        lines = [ln.strip() for ln in f if len(ln.strip()) > 20]
    with open(os.path.join(folder, "mc.jsonl"), "w") as f:
        for i in range(docs):
            ctx = lines[i]
            choices = [" ".join(lines[i + 1 + j].split()[:4]) for j in range(4)]
            f.write(json.dumps({"context": ctx, "choices": choices, "label": i % 4}) + "\n")
    with open(os.path.join(folder, "speed_mc.yaml"), "w") as f:
        f.write(TASK.format(data=os.path.join(folder, "mc.jsonl")))


def timed(lm_factory, folder: str) -> tuple[float, dict, int]:
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager

    t0 = time.perf_counter()
    lm = lm_factory()
    results = evaluator.simple_evaluate(
        model=lm,
        tasks=["speed_mc"],
        task_manager=TaskManager(include_path=folder, include_defaults=False),
        bootstrap_iters=0,
        log_samples=True,
    )
    seconds = time.perf_counter() - t0
    n = sum(len(s["resps"]) for s in results["samples"]["speed_mc"])
    return seconds, results, n


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--docs", type=int, default=250)
    p.add_argument("--batch_size", type=int, default=16)
    args = p.parse_args()
    from lm_eval.models.huggingface import HFLM

    with tempfile.TemporaryDirectory() as tmp:
        write_task(tmp, args.docs)
        model = GPT(GPTConfig(), nnx.Rngs(0))  # GPT-2 124M, random init
        work, hf_dir = os.path.join(tmp, "work"), os.path.join(tmp, "hf")
        convert.write_workdir(model, work, "random init")
        hf_gpt2.to_hf(model, hf_dir)
        del model
        ours_s, ours, n = timed(
            lambda: harness.LlmjaxLM(workdir=work, batch_size=args.batch_size), tmp
        )
        hf_s, theirs, n_hf = timed(
            lambda: HFLM(
                pretrained=hf_dir, dtype="float32", device="cpu", batch_size=args.batch_size
            ),
            tmp,
        )
    assert n == n_hf
    acc = {k: ours["results"]["speed_mc"][k] for k in ("acc,none", "acc_norm,none")}
    acc_hf = {k: theirs["results"]["speed_mc"][k] for k in ("acc,none", "acc_norm,none")}
    print(
        json.dumps(
            {
                "benchmark": "harness_speed",
                "model": "gpt2-124M-shaped (random init, float32)",
                "requests": n,
                "batch_size": args.batch_size,
                "llmjax_seconds": round(ours_s, 2),
                "hf_seconds": round(hf_s, 2),
                "llmjax_requests_per_s": round(n / ours_s, 2),
                "hf_requests_per_s": round(n / hf_s, 2),
                "speedup": round(hf_s / ours_s, 3),
                "same_metrics": acc == acc_hf,
                "device": jax.devices()[0].device_kind,
                "cpu_count": os.cpu_count(),
                "load_avg_1min": round(os.getloadavg()[0], 2),
                "machine": platform.machine(),
            }
        )
    )


if __name__ == "__main__":
    main()
