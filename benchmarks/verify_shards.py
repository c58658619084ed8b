"""Throughput of the data check before step 1 (integrity.py): sha256 and largest id per shard.

python benchmarks/verify_shards.py [--shards=4] [--mb_per_shard=256] [--dir=/tmp/verify_bench]

Writes `shards` train shards (and one small val shard) of random GPT-2 ids with a meta.json,
then times data.check_dataset with data.verify=full (every byte hashed and scanned; the files
are in the page cache, so this is the check's own speed, not the disk's) and with cached (a
resume: nothing reread). Last line: one JSON object.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time

import numpy as np
from absl import app, flags

from llmjax import data, integrity, shards

flags.DEFINE_integer("shards", 4, "train shards")
flags.DEFINE_integer("mb_per_shard", 256, "size of each train shard, MB")
flags.DEFINE_string("dir", None, "where to write them (default: a temporary directory)")
FLAGS = flags.FLAGS


def _write(path: str, tokens: np.ndarray) -> dict:
    shards.write_shard(path, tokens)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return {"name": os.path.basename(path), "tokens": len(tokens), "sha256": digest}


def main(argv: list[str]) -> None:
    del argv
    out = FLAGS.dir or tempfile.mkdtemp(prefix="verify_bench")
    os.makedirs(out, exist_ok=True)
    os.environ["LLMJAX_CACHE"] = os.path.join(out, "cache")
    rng = np.random.default_rng(0)
    n = FLAGS.mb_per_shard * 1_000_000 // 2
    listed = {
        "train": [
            _write(
                os.path.join(out, shards.shard_name("train", i)), rng.integers(0, 50257, n, "u2")
            )
            for i in range(FLAGS.shards)
        ],
        "val": [_write(os.path.join(out, "val_000000.bin"), rng.integers(0, 50257, 10**6, "u2"))],
    }
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump({"tokenizer": "gpt2", "shards": listed}, f)
    data.check_dataset(out, "gpt2", 1024, "full")  # warm the page cache
    t0 = time.time()
    full = data.check_dataset(out, "gpt2", 1024, "full")
    full_s = time.time() - t0
    t0 = time.time()
    cached = data.check_dataset(out, "gpt2", 1024, "cached")
    cached_s = time.time() - t0
    one = os.path.join(out, listed["train"][0]["name"])
    t0 = time.time()
    integrity.scan(one)
    single_s = time.time() - t0
    one_mb = os.path.getsize(one) / 1e6
    if FLAGS.dir is None:
        shutil.rmtree(out)
    print(
        json.dumps(
            {
                "bytes": full["bytes"],
                "full_s": round(full_s, 3),
                "full_mb_per_s": round(full["bytes"] / 1e6 / full_s, 1),
                "one_shard_one_thread_mb_per_s": round(one_mb / single_s, 1),
                "cached_s": round(cached_s, 4),
                "cached_shards_read": cached["shards"],
                "cpus": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    app.run(main)
