"""llm.c's token shard format: one .bin file is a 256-int32 header, then uint16 tokens.

The header holds magic 20240520, version 1 and the token count; the other 253 ints are zero. This
is the file llm.c's `write_datafile` writes and its C loader reads, so shards move between llm.c,
modded-nanogpt and llmjax as they are.

Names: prepare writes {split}_{index:06d}.bin. Tools that write the same format put a dataset name
in front (llm.c: fineweb_val_000000.bin, edu_fineweb_train_000001.bin, tiny_shakespeare_val.bin;
modded-nanogpt: fineweb_train_000001.bin), so a split's shards are [PREFIX_]{split}[_INDEX].bin.
"""

from __future__ import annotations

import os
import re

import numpy as np

from llmjax.errors import UserError

MAGIC, VERSION, HEADER_INTS = 20240520, 1, 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.uint16
MAX_TOKENS = 2**31 - 1  # the header's count is an int32
META_FILE = "meta.json"  # the dataset card beside the shards (written by llmjax.prepare)
# For meta.json: what a reader needs to know about the files beside it.
FORMAT = {"magic": MAGIC, "version": VERSION, "header_bytes": HEADER_BYTES, "dtype": "uint16"}


class DataError(UserError):
    """Bad input data; the message names the file and the problem."""


def shard_name(split: str, index: int) -> str:
    """The name prepare gives a split's index-th shard."""
    return f"{split}_{index:06d}.bin"


def shard_bytes(tokens: int) -> int:
    """The size of a whole shard holding `tokens` tokens."""
    return HEADER_BYTES + np.dtype(TOKEN_DTYPE).itemsize * tokens


def header(tokens: int) -> bytes:
    h = np.zeros(HEADER_INTS, np.int32)
    h[:3] = (MAGIC, VERSION, tokens)
    return h.tobytes()


def read_shard(path: str) -> np.ndarray:
    """Memory-maps one shard's tokens after checking its header against its size."""
    try:
        h = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from e
    if len(h) < HEADER_INTS:
        raise DataError(f"{path}: shorter than the {HEADER_BYTES}-byte header")
    if h[0] != MAGIC:
        raise DataError(f"{path}: bad magic {h[0]} (expected {MAGIC}, an llm.c .bin shard)")
    if h[1] != VERSION:
        raise DataError(f"{path}: unsupported version {h[1]} (expected {VERSION})")
    n = int(h[2])
    size = os.path.getsize(path)
    if size != shard_bytes(n):
        raise DataError(
            f"{path}: header says {n} tokens ({shard_bytes(n)} bytes) but the file has {size} bytes"
        )
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(n,))


def write_shard(path: str, tokens) -> None:
    """Writes a whole shard at once."""
    f = ShardFile(path)
    f.append(tokens)
    f.finish()


class ShardFile:
    """A shard written incrementally: tokens go after a zeroed header, which gets its count in
    finish(). Until then the file fails read_shard (magic 0), so a crash never leaves a file that
    reads as data."""

    def __init__(self, path: str, tokens: int = 0):
        """With `tokens`, reopens an unfinished file and cuts it back to that many tokens."""
        self.path, self.tokens = path, tokens
        if tokens:
            self.f = open(path, "r+b")
            self.f.truncate(shard_bytes(tokens))
            self.f.seek(0, os.SEEK_END)
        else:
            self.f = open(path, "wb", buffering=1 << 20)
            self.f.write(bytes(HEADER_BYTES))

    def append(self, tokens) -> None:
        arr = np.ascontiguousarray(tokens, TOKEN_DTYPE)
        if self.tokens + len(arr) > MAX_TOKENS:
            raise ValueError(f"{self.path}: more than {MAX_TOKENS} tokens in one shard")
        self.f.write(arr.data)
        self.tokens += len(arr)

    def sync(self) -> None:
        """Makes what was appended so far durable (a checkpoint may count on it)."""
        self.f.flush()
        os.fsync(self.f.fileno())

    def finish(self) -> None:
        self.f.seek(0)
        self.f.write(header(self.tokens))
        self.sync()
        self.f.close()


_NAME = re.compile(r"(?P<prefix>(?:.*_)?)(?P<split>train|val)(?:_(?P<index>\d+))?\.bin")


def split_paths(path: str, split: str) -> list[str]:
    """The split's shards under `path`, [PREFIX_]{split}[_INDEX].bin, in index order.

    One prefix per split: shards under two would be two datasets mixed (or one left over), and
    training on both without a word is worse than asking."""
    if not os.path.isdir(path):
        raise DataError(f"data.path={path!r}: no such directory (run python -m llmjax.prepare)")
    found: dict[str, list[tuple[int, str]]] = {}
    for name in os.listdir(path):
        m = _NAME.fullmatch(name)
        # Hidden files, as a glob skips them: macOS leaves ._NAME beside every copied file.
        if m and m["split"] == split and not name.startswith("."):
            index = -1 if m["index"] is None else int(m["index"])
            found.setdefault(m["prefix"], []).append((index, name))
    if not found:
        raise DataError(
            f"data.path={path!r}: no {split}_*.bin shards, nor any other "
            f"[PREFIX_]{split}[_INDEX].bin (such as fineweb_{split}_000001.bin, "
            f"tiny_shakespeare_{split}.bin)"
        )
    if len(found) > 1:
        a, b = (
            prefix + split + ("_*" if any(i >= 0 for i, _ in shards) else "") + ".bin"
            for prefix, shards in sorted(found.items())[:2]
        )
        raise DataError(f"data.path={path!r}: {split} shards under two names, {a} and {b}")
    (shards,) = found.values()
    return [os.path.join(path, name) for _, name in sorted(shards)]
