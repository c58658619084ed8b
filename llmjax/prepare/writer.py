"""Output: each split's shards written as they fill (`ShardWriter`), and the decision of which
split a document goes to (`Router`)."""

from __future__ import annotations

import base64
import hashlib
import heapq
import os

import numpy as np

from llmjax.shards import ShardFile, shard_name


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


class ShardWriter:
    """Appends one split's tokens to {split}_{index:06d}.bin.tmp; a full shard gets its header and
    is renamed into place, so a .bin file is always whole. Only the tail after the last checkpoint
    can be lost, and resuming cuts the .tmp back to the checkpoint's length."""

    def __init__(
        self,
        out: str,
        split: str,
        shard_tokens: int,
        shards: list[dict] | None = None,
        partial: int = 0,
        docs: int = 0,
    ):
        self.out, self.split, self.shard_tokens = out, split, shard_tokens
        self.shards: list[dict] = list(shards or [])
        self.docs, self.n, self.f = docs, 0, None
        self.finished = False  # a shard was completed since the last checkpoint
        tmp = self._tmp()
        if partial:
            self.f = ShardFile(tmp, partial)  # held open across add() calls
            self.n = partial
        elif os.path.exists(tmp):
            os.remove(tmp)

    def _tmp(self) -> str:
        return os.path.join(self.out, shard_name(self.split, len(self.shards)) + ".tmp")

    def add(self, tokens) -> None:
        arr = np.ascontiguousarray(tokens, np.uint16)
        while len(arr):
            if self.f is None:
                self.f = ShardFile(self._tmp())
            take = min(len(arr), self.shard_tokens - self.n)
            self.f.append(arr[:take])
            self.n += take
            arr = arr[take:]
            if self.n == self.shard_tokens:
                self.flush()

    def flush(self) -> None:
        """Finishes the current shard (if it holds any tokens)."""
        if self.f is None:
            return
        self.f.finish()
        tmp, self.f = self._tmp(), None
        self.shards.append(
            {
                "name": shard_name(self.split, len(self.shards)),
                "tokens": self.n,
                "sha256": file_sha256(tmp),
            }
        )
        os.replace(tmp, os.path.join(self.out, self.shards[-1]["name"]))
        self.n, self.finished = 0, True

    def sync(self) -> None:
        if self.f is not None:
            self.f.sync()

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards) + self.n

    def state(self) -> dict:
        return {"shards": self.shards, "partial": self.n, "docs": self.docs}


class Router:
    """Sends each kept document wholly to train or val by its hash.

    --val_fraction: hash < fraction goes to val; the lowest-hash other document is held back to the
    end and goes to val if val would otherwise be empty. --val_docs=K: the K lowest hashes go to
    val, so they are held until the end (evicted ones go to train as they lose their place).
    Held documents are written in source order."""

    def __init__(
        self,
        writers: dict[str, ShardWriter],
        val_fraction: float,
        val_docs: int,
        held: list[tuple[float, int, np.ndarray]] = (),
    ):
        self.writers, self.val_fraction, self.val_docs = writers, val_fraction, val_docs
        self.held = [(-h, i, t) for h, i, t in held]  # max-heap on hash
        heapq.heapify(self.held)

    def _write(self, split: str, tokens: np.ndarray) -> None:
        self.writers[split].add(tokens)
        self.writers[split].docs += 1

    def route(self, h: float, index: int, tokens: np.ndarray) -> None:
        if not self.val_docs and h < self.val_fraction:
            return self._write("val", tokens)
        if len(self.held) < (self.val_docs or 1):
            return heapq.heappush(self.held, (-h, index, tokens))
        if h < -self.held[0][0]:
            _, _, tokens = heapq.heapreplace(self.held, (-h, index, tokens))
        self._write("train", tokens)

    def finish(self) -> None:
        to = "val" if self.val_docs or self.writers["val"].docs == 0 else "train"
        for _, _, tokens in sorted(self.held, key=lambda e: e[1]):
            self._write(to, tokens)
        self.held = []

    def state(self) -> list[dict]:
        return [
            {"hash": -h, "index": i, "tokens": base64.b64encode(t.tobytes()).decode()}
            for h, i, t in sorted(self.held, key=lambda e: e[1])
        ]

    @staticmethod
    def held_from(state: list[dict]) -> list[tuple[float, int, np.ndarray]]:
        return [
            (e["hash"], e["index"], np.frombuffer(base64.b64decode(e["tokens"]), np.uint16))
            for e in state
        ]
