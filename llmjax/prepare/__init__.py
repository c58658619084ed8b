"""Sources -> documents -> tokens -> llm.c-format shards plus meta.json.

    python -m llmjax.prepare --source=hf:HuggingFaceFW/fineweb-edu --hf_config=sample-10BT \
        --out=data/fineweb10B
    python -m llmjax.prepare --source=jsonl:'my/*.jsonl' --text_field=content --dedup --out=data/my
    python -m llmjax.prepare --source=builtin:pydocs --tokenizer=bytes --out=data/pydocs

Every document is preceded by the end-of-text id, the delimiter GPT-2 and llm.c use. A document goes
wholly to train or wholly to val, decided by a stable hash of its text, so the split depends neither
on document order nor on the number of tokenizer processes; output is byte-identical for any
--workers. An interrupted run resumes when started again with the same options: finished shards
are checked (size, sha256) and kept, the unfinished tail is cut back to the last checkpoint, and
the source is re-read (not re-tokenized) up to that point.

The package, in the order a document flows: sources.py (documents from hf/jsonl/parquet/text/
pydocs), encode.py (tokenizer workers), writer.py (the split router and shard writers),
documents.py (the pass: counters, checkpoint, meta.json), dataset.py (the output directory's
state and card), __main__.py (the CLI). `prepare` below is the one entry point.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from llmjax.prepare import dataset
from llmjax.prepare.documents import run_pass
from llmjax.prepare.encode import start_pool
from llmjax.shards import TOKEN_DTYPE, DataError
from llmjax.tokenizer import get_tokenizer


def prepare(
    source: str,
    out: str,
    tokenizer: str = "gpt2",
    val_fraction: float = 0.01,
    shard_tokens: int = 100_000_000,
    *,
    val_docs: int = 0,
    workers: int = 0,
    dedup: bool = False,
    min_chars: int = 0,
    max_docs: int = 0,
    max_tokens: int = 0,
    text_field: str = "text",
    hf_config: str = "",
    hf_split: str = "train",
    verbose: bool = False,
) -> dict:
    """Tokenizes `source` into shards under `out` and returns the meta.json contents.

    The arguments are the CLI's flags (see __main__.py), except that `workers` defaults to 0
    here (tokenize in this process) and to the CPU count on the command line. Starting it again
    on the same `out` with the same options resumes an interrupted run, or returns a finished
    run's meta; other options, or shards prepare did not write, are refused (ValueError)."""
    options = {
        "source": source,
        "tokenizer": tokenizer,
        "val_fraction": val_fraction,
        "val_docs": val_docs,
        "shard_tokens": shard_tokens,
        "dedup": dedup,
        "min_chars": min_chars,
        "max_docs": max_docs,
        "max_tokens": max_tokens,
        "text_field": text_field,
        "hf_config": hf_config,
        "hf_split": hf_split,
    }
    dataset.check_options({**options, "workers": workers})
    tok = get_tokenizer(tokenizer)
    if tok.vocab_size > np.iinfo(TOKEN_DTYPE).max + 1:
        raise DataError(
            f"--tokenizer={tokenizer} has ids up to {tok.vocab_size - 1}, beyond "
            "uint16 (65535): llm.c shards hold uint16 tokens"
        )
    os.makedirs(out, exist_ok=True)
    done = dataset.claim(out, options)
    if done is not None:
        if verbose:
            print(f"prepare: {out} is already complete", file=sys.stderr)
        return done
    state = dataset.resume_state(out, options) or dataset.new_state(options)
    dataset.remove_stale(out, state)
    pool = start_pool(workers, tokenizer)
    try:
        return run_pass(state, out, tok, pool, workers, verbose)
    finally:
        if pool is not None:
            # No waiting for the processes to exit: each finishes its task (if any) and goes.
            pool.shutdown(wait=False, cancel_futures=True)
