"""Datasets of token shards (llm.c's .bin format, see shards.py) and the Grain pipelines that turn
them into batches.

Batches are addressed by step: training batch i is a pure function of (seed, i), so resuming at step
i needs nothing but i, and the batch never depends on the number of loader workers or processes.
Each process reads only its own rows of the global batch.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator

import numpy as np
from absl import flags

from llmjax.config import VERIFY

# DataError, read_shard and split_paths are part of this module's API; the format lives in shards.
from llmjax.shards import META_FILE, DataError, read_shard, split_paths

PREPARE_STATE = "prepare_state.json"  # prepare's checkpoint, present only while it is unfinished


def read_meta(path: str) -> dict:
    """meta.json written by prepare, or {} for shards made elsewhere (llm.c, modded-nanogpt)."""
    meta_path = os.path.join(path, META_FILE)
    if not os.path.exists(meta_path):
        if os.path.exists(os.path.join(path, PREPARE_STATE)):
            raise DataError(
                f"data.path={path!r}: prepare has not finished there (found "
                f"{PREPARE_STATE}); run the same prepare command again to finish it"
            )
        return {}
    try:
        with open(meta_path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{meta_path}: unreadable ({e})") from e


def check_dataset(path: str, tokenizer: str, seq_len: int, verify: str = "cached") -> dict:
    """Fails fast, before anything compiles, on data the run cannot use.

    Every shard's header, size and token count (against meta.json when there is one); then its
    contents, as `verify` (data.verify) says: the sha256 that meta.json lists and the largest
    token id against the vocabulary (integrity.py; shards made elsewhere, such as llm.c's, have
    no meta.json and get the id check alone). An out-of-range id would silently read a padding
    row or a clamped one in JAX. Returns what the content check read (integrity.verify).
    """
    from llmjax import integrity  # late, as the tokenizer: keeps prepare's workers light
    from llmjax.tokenizer import get_tokenizer

    if verify not in VERIFY:
        raise DataError(f"data.verify={verify!r} is not one of {', '.join(VERIFY)}")
    meta = read_meta(path)
    if meta and meta.get("tokenizer") != tokenizer:
        raise DataError(
            f"data.path={path!r} was tokenized with {meta.get('tokenizer')!r} "
            f"but data.tokenizer={tokenizer!r}"
        )
    expected: dict[str, str | None] = {}
    for split in ("train", "val"):
        paths = split_paths(path, split)
        lengths = {os.path.basename(p): len(read_shard(p)) for p in paths}
        listed_sha: dict[str, str | None] = {}
        if meta and "shards" in meta:
            listed = {s["name"]: s["tokens"] for s in meta["shards"][split]}
            listed_sha = {s["name"]: s.get("sha256") for s in meta["shards"][split]}
            for name in sorted(listed.keys() - lengths.keys()):
                raise DataError(f"{os.path.join(path, name)}: listed in meta.json but missing")
            for name in sorted(lengths.keys() - listed.keys()):
                raise DataError(
                    f"{os.path.join(path, name)}: not listed in meta.json "
                    "(left over from another dataset?)"
                )
            for name, n in sorted(lengths.items()):
                if n != listed[name]:
                    raise DataError(
                        f"{os.path.join(path, name)}: {n} tokens, but meta.json says {listed[name]}"
                    )
        longest = max(lengths.values())
        if longest < seq_len + 1:
            raise DataError(
                f"data.path={path!r}: the {split} split ({sum(lengths.values())} "
                f"tokens, longest shard {longest}) is smaller than one window of "
                f"seq_len+1={seq_len + 1}"
            )
        expected.update({p: listed_sha.get(os.path.basename(p)) for p in paths})
    vocab = get_tokenizer(tokenizer).vocab_size
    return integrity.verify(expected, vocab, tokenizer, verify)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a fast, well-mixed, stateless hash of uint64 counters."""
    x = x.astype(np.uint64)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class _Windows:
    """Windows of seq_len+1 tokens that never cross a shard boundary. Picklable for Grain workers:
    holds paths and opens memory maps lazily in whichever process reads."""

    def __init__(self, paths: list[str], seq_len: int, vocab_size: int, stride: int):
        self.paths, self.seq_len, self.vocab_size, self.stride = paths, seq_len, vocab_size, stride
        lengths = np.array([len(read_shard(p)) for p in paths], np.int64)
        # Window starts per shard: 0, stride, 2*stride, ... while a whole window fits.
        self.counts = np.maximum((lengths - seq_len - 1) // stride + 1, 0)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)])
        self.total = int(self.offsets[-1])
        if self.total == 0:
            raise DataError(
                f"{', '.join(paths)}: no shard holds one window of seq_len+1="
                f"{seq_len + 1} tokens (longest: {int(lengths.max())})"
            )

    @functools.cached_property
    def shards(self) -> list[np.ndarray]:
        return [read_shard(p) for p in self.paths]

    def gather(self, windows: np.ndarray) -> np.ndarray:
        """Tokens [len(windows), seq_len+1] (int32) for global window indices."""
        shard = np.searchsorted(self.offsets, windows, side="right") - 1
        starts = (windows - self.offsets[shard]) * self.stride
        out = np.empty((len(windows), self.seq_len + 1), np.int32)
        for r, (s, t) in enumerate(zip(shard, starts, strict=True)):
            out[r] = self.shards[s][t : t + self.seq_len + 1]
        bad = out >= self.vocab_size
        if bad.any():
            r = int(np.argwhere(bad)[0][0])
            raise DataError(
                f"{self.paths[shard[r]]}: token id {int(out[bad].max())} >= "
                f"vocabulary size {self.vocab_size}"
            )
        return out


class _TrainBatch:
    """Step -> this process's rows of the global batch, at positions hashed from (seed, example)."""

    def __init__(self, windows: _Windows, seed: int, batch: int, rows: slice):
        self.windows, self.seed, self.batch, self.rows = windows, seed, batch, rows

    def __call__(self, step: int) -> np.ndarray:
        example = np.arange(self.batch, dtype=np.uint64)[self.rows] + np.uint64(step * self.batch)
        key = _mix(np.array([self.seed], np.uint64))[0]
        # Any window start in the whole token stream, so training never drifts through one document.
        w = _mix(example ^ key) % np.uint64(self.windows.total)
        return self.windows.gather(w.astype(np.int64))


class _ValBatch:
    """Batch k -> fixed, non-overlapping windows k*B .. (k+1)*B-1: the same every evaluation."""

    def __init__(self, windows: _Windows, batch: int, rows: slice):
        self.windows, self.batch, self.rows = windows, batch, rows

    def __call__(self, k: int) -> np.ndarray:
        w = np.arange(k * self.batch, (k + 1) * self.batch, dtype=np.int64)[self.rows]
        return self.windows.gather(w % self.windows.total)


def process_rows(batch: int, process_index: int, process_count: int) -> slice:
    if batch % process_count:
        raise DataError(f"data.batch_size={batch} is not divisible by {process_count} processes")
    per = batch // process_count
    return slice(process_index * per, (process_index + 1) * per)


def iterate_steps(
    start: int, stop: int, fn, workers: int = 0, prefetch: int = 4
) -> Iterator[np.ndarray]:
    """fn(i) for i in [start, stop), read `prefetch` batches ahead in threads (and `workers`
    processes), so the train step never waits on reading."""
    import grain  # here, not at the top: prepare's tokenizer processes need only the format

    ds = grain.MapDataset.range(start, stop).map(fn)
    it = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=max(1, min(prefetch, 8)), prefetch_buffer_size=prefetch)
    )
    if workers > 0:
        if not flags.FLAGS.is_parsed():
            # Grain's workers read absl flags; a library caller (tests, notebooks) never parsed any.
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return iter(it)


def train_batches(
    path: str,
    *,
    seq_len: int,
    batch: int,
    vocab_size: int,
    seed: int,
    start_step: int,
    steps: int,
    workers: int = 0,
    prefetch: int = 4,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[np.ndarray]:
    """Yields int32 [batch/process_count, seq_len+1] for steps start_step .. steps-1."""
    windows = _Windows(split_paths(path, "train"), seq_len, vocab_size, stride=1)
    fn = _TrainBatch(windows, seed, batch, process_rows(batch, process_index, process_count))
    return iterate_steps(start_step, steps, fn, workers, prefetch)


def count_val_windows(path: str, seq_len: int) -> int:
    """How many distinct windows `val_batches` reads before it wraps around: a whole pass over
    the val split is this many rows."""
    return _Windows(split_paths(path, "val"), seq_len, vocab_size=0, stride=seq_len).total


def val_batches(
    path: str,
    *,
    seq_len: int,
    batch: int,
    vocab_size: int,
    num_batches: int,
    workers: int = 0,
    prefetch: int = 4,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[np.ndarray]:
    """Yields the same `num_batches` validation batches every time it is called."""
    windows = _Windows(split_paths(path, "val"), seq_len, vocab_size, stride=seq_len)
    fn = _ValBatch(windows, batch, process_rows(batch, process_index, process_count))
    return iterate_steps(0, num_batches, fn, workers, prefetch)
