"""Decode speed of llmjax.sample.generate against transformers' generate on the same GPT-2.

    python benchmarks/sample_speed.py [--n_layer=12 --n_embd=768 --n_head=12] [--new_tokens=128]

Both sides run greedy decoding with their KV caches on one randomly initialised GPT-2 (124M shape by
default; no download), the same prompt and the same number of new tokens, in this process.
tokens/s = new tokens / wall time of the whole generate call (prefill included), best of --repeats
after a warm-up call that compiles. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from llmjax.hf_gpt2 import from_state_dict
from llmjax.sample import generate


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up: compilation, allocator, caches
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n_layer", type=int, default=12)
    p.add_argument("--n_head", type=int, default=12)
    p.add_argument("--n_embd", type=int, default=768)
    p.add_argument("--prompt_tokens", type=int, default=16)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--torch_threads",
        type=int,
        default=0,
        help="torch intra-op threads; 0 = torch's default (one per core). On a busy "
        "machine torch's spinning threads slow it badly: compare with 1 as well",
    )
    args = p.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    torch.manual_seed(0)
    hf_cfg = GPT2Config(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    hf = GPT2LMHeadModel(hf_cfg).eval()
    model = from_state_dict(
        hf_cfg.to_dict(), {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    )
    prompts = np.random.default_rng(0).integers(0, 50257, (args.batch, args.prompt_tokens))
    N = args.new_tokens

    ours: list = []
    t_ours = best_time(
        lambda: ours.__setitem__(
            slice(None), generate(model, prompts.tolist(), N, temperature=0.0)
        ),
        args.repeats,
    )
    theirs: list = []
    ids = torch.tensor(prompts)

    def hf_generate():
        with torch.no_grad():
            out = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=N,
                min_new_tokens=N,
                do_sample=False,
                use_cache=True,
                pad_token_id=50256,
            )
        theirs[:] = out[:, args.prompt_tokens :].tolist()

    t_hf = best_time(hf_generate, args.repeats)
    ours_tps, hf_tps = args.batch * N / t_ours, args.batch * N / t_hf
    print(
        json.dumps(
            {
                "llmjax_tokens_per_sec": round(ours_tps, 2),
                "hf_tokens_per_sec": round(hf_tps, 2),
                "speedup": round(ours_tps / hf_tps, 3),
                "tokens_identical": ours == theirs,
                "shape": {"n_layer": args.n_layer, "n_head": args.n_head, "n_embd": args.n_embd},
                "batch": args.batch,
                "prompt_tokens": args.prompt_tokens,
                "new_tokens": N,
                "device": jax.devices()[0].device_kind,
                "torch_threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
