"""Shard contents checked before step 1: each shard's sha256 against meta.json and its largest
token id against the vocabulary, in one read of the file.

A byte flipped inside a shard trains on without a word when the ids stay valid, and an id beyond
the vocabulary is otherwise found only when a random batch reaches it, hours into a run. Both are
found here, before anything compiles. Shards without a sha256 (llm.c's own, no meta.json) get the
id check alone.

`data.verify` chooses how much is read: `full` reads every shard on every start; `cached` (the
default) skips a shard this user already verified, as long as its path, size and modification time
are those it had then (a copy or an edit changes them; an in-place edit that restores the mtime
needs `full`); `off` reads nothing (ids are still checked batch by batch as they are read).
The cache is one JSON file, CACHE_FILE under $LLMJAX_CACHE (default ~/.cache/llmjax).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import time

import numpy as np

from llmjax.shards import HEADER_BYTES, TOKEN_DTYPE, DataError

CACHE_FILE = "verified_shards.json"
_CHUNK = 1 << 24  # 16 MiB reads: hashlib and numpy release the GIL on blocks this size


def cache_path() -> str:
    root = os.environ.get("LLMJAX_CACHE", os.path.expanduser("~/.cache/llmjax"))
    return os.path.join(root, CACHE_FILE)


def scan(path: str) -> tuple[str, int]:
    """(sha256 of the whole file, largest token id; -1 for no tokens), from one read."""
    h, top = hashlib.sha256(), -1
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    offset = 0  # bytes of the file read so far
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            start = max(0, HEADER_BYTES - offset)  # the header is not tokens
            body = view[start:n]
            if len(body) >= 2:
                top = max(top, int(np.frombuffer(body[: len(body) // 2 * 2], TOKEN_DTYPE).max()))
            offset += n
    return h.hexdigest(), top


def _key(path: str) -> tuple[str, dict]:
    st = os.stat(path)
    return os.path.realpath(path), {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _load_cache() -> dict:
    try:
        with open(cache_path()) as f:
            return json.load(f)
    except (OSError, ValueError):  # none yet, or damaged: verify again
        return {}


def _save_cache(entries: dict) -> None:
    path = cache_path()
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "w") as f:
            json.dump(entries, f)
        os.replace(tmp, path)  # atomic: processes verifying at once never see half a file
    except OSError:  # a read-only home: the next start verifies again, nothing worse
        pass


def verify(expected: dict[str, str | None], vocab: int, tokenizer: str, mode: str) -> dict:
    """Checks shards {path: sha256 from meta.json, or None} or raises DataError naming the first
    bad one. Returns {"shards", "bytes", "seconds"} of what was read (0 shards: all cached)."""
    if mode == "off":
        return {"shards": 0, "bytes": 0, "seconds": 0.0}
    cache = _load_cache() if mode == "cached" else {}
    todo = []
    for path, sha in sorted(expected.items()):
        real, stat = _key(path)
        hit = cache.get(real)
        if hit and hit["stat"] == stat and (sha is None or hit["sha256"] == sha):
            if hit["max_id"] < vocab:
                continue
        todo.append((path, sha, real, stat))
    t0 = time.time()
    workers = min(len(todo), os.cpu_count() or 1, 8) or 1
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda item: scan(item[0]), todo))
    seconds = time.time() - t0
    fresh = _load_cache()  # another run may have added entries meanwhile
    for (path, sha, real, stat), (digest, top) in zip(todo, results, strict=True):
        if sha is not None and digest != sha:
            raise DataError(
                f"{path}: contents do not match the sha256 in meta.json (changed or damaged "
                "after prepare wrote it); prepare the data again or restore the file"
            )
        if top >= vocab:
            raise DataError(
                f"{path}: token id {top} >= vocabulary size {vocab} (data.tokenizer={tokenizer})"
            )
        fresh[real] = {"stat": stat, "sha256": digest, "max_id": top}
    if todo:
        _save_cache(fresh)
    return {"shards": len(todo), "bytes": sum(st["size"] for *_, st in todo), "seconds": seconds}
