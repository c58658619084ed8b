"""Tokenizers: GPT-2's BPE (tiktoken, offline from package data) and raw UTF-8 bytes.

Both expose the same small surface: `encode(text) -> list[int]`, `decode(ids) -> str`,
`encode_batch(texts)`, `encode_numpy(text)` (an array, without Python lists: what data
preparation runs), `eot_id`, `vocab_size` and `special` (name -> id). Plain text is always
encoded as ordinary text, so a document that merely contains the spelling "<|endoftext|>" or
"<|user|>" can never inject a special token.

The `-chat` variants ("gpt2-chat", "bytes-chat") add the chat template's tokens after the base
vocabulary (GPT-2: ids 50257..50260), still inside the padded embedding (50304 rows).
"""

from __future__ import annotations

import functools
import hashlib
from importlib import resources
from typing import Protocol

import numpy as np
import tiktoken

from llmjax.config import TOKENIZERS
from llmjax.errors import UserError

# The hashes tiktoken pins for its own `gpt2` encoding (tiktoken_ext/openai_public.py).
GPT2_FILE_SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
# GPT-2's pre-tokenisation regex (tiktoken's r50k/gpt2 pattern).
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT = "<|endoftext|>"
# Phi-3 style chat roles and turn terminator, appended after the base vocabulary in this order.
CHAT_TOKENS = ("<|user|>", "<|assistant|>", "<|end|>", "<|system|>")


class Tokenizer(Protocol):
    name: str
    eot_id: int
    vocab_size: int
    special: dict[str, int]
    chat: bool  # has the chat template's tokens

    def encode(self, text: str) -> list[int]: ...
    def encode_batch(self, texts: list[str], threads: int = 1) -> list[list[int]]: ...
    def encode_numpy(self, text: str) -> np.ndarray: ...
    def decode(self, ids: list[int]) -> str: ...


class GPT2Tokenizer:
    """tiktoken's GPT-2 encoding, built from the BPE files shipped inside the package."""

    def __init__(self, chat: bool = False) -> None:
        self.name, self.chat = ("gpt2-chat" if chat else "gpt2"), chat
        self.special = {EOT: 50256}
        if chat:
            self.special.update({t: 50257 + i for i, t in enumerate(CHAT_TOKENS)})
        self._enc = tiktoken.Encoding(
            name=self.name,
            pat_str=GPT2_PAT,
            mergeable_ranks=_gpt2_ranks(),
            special_tokens=self.special,
            explicit_n_vocab=50257 + (len(CHAT_TOKENS) if chat else 0),
        )
        self.eot_id = self._enc.eot_token
        self.vocab_size = self._enc.n_vocab

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str], threads: int = 1) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(texts, num_threads=threads)

    def encode_numpy(self, text: str) -> np.ndarray:
        """uint32 ids; disallowed_special=() encodes "<|endoftext|>" as plain text."""
        return self._enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())

    def decode(self, ids: list[int]) -> str:
        return self._enc.decode([i for i in ids if i < self.vocab_size])


class ByteTokenizer:
    """UTF-8 bytes plus one end-of-text id: tiny vocabulary, so small CPU runs learn fast."""

    eot_id = 256

    def __init__(self, chat: bool = False) -> None:
        self.name, self.chat = ("bytes-chat" if chat else "bytes"), chat
        self.special = {EOT: 256}
        if chat:
            self.special.update({t: 257 + i for i, t in enumerate(CHAT_TOKENS)})
        self.vocab_size = 256 + len(self.special)
        self._names = {i: t for t, i in self.special.items() if i != self.eot_id}

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str], threads: int = 1) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_numpy(self, text: str) -> np.ndarray:
        """uint8 ids: the UTF-8 bytes themselves."""
        return np.frombuffer(text.encode("utf-8"), np.uint8)

    def decode(self, ids: list[int]) -> str:
        # Bytes between special tokens decode together, so multi-byte characters survive.
        out, run = [], bytearray()
        for i in ids:
            if i < 256:
                run.append(i)
            elif i in self._names:
                out += [run.decode("utf-8", errors="replace"), self._names[i]]
                run = bytearray()
        return "".join(out) + run.decode("utf-8", errors="replace")


def _gpt2_ranks() -> dict[bytes, int]:
    files = resources.files("llmjax") / "assets" / "gpt2"
    blobs = {name: (files / name).read_bytes() for name in GPT2_FILE_SHA256}
    for name, want in GPT2_FILE_SHA256.items():
        got = hashlib.sha256(blobs[name]).hexdigest()
        if got != want:
            raise RuntimeError(f"llmjax/assets/gpt2/{name}: sha256 {got} != pinned {want}")
    # The same decoding tiktoken.load.data_gym_to_mergeable_bpe_ranks performs, minus the I/O.
    rank_to_byte = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    data_gym_byte_to_byte = {chr(b): b for b in rank_to_byte}
    n = 0
    for b in range(256):
        if b not in rank_to_byte:
            rank_to_byte.append(b)
            data_gym_byte_to_byte[chr(256 + n)] = b
            n += 1
    ranks = {bytes([b]): i for i, b in enumerate(rank_to_byte)}

    def decode(word: str) -> bytes:
        return bytes(data_gym_byte_to_byte[c] for c in word)

    merges = blobs["vocab.bpe"].decode("utf-8").split("\n")[1:-1]
    for line in merges:
        first, second = line.split()
        ranks[decode(first) + decode(second)] = len(ranks)
    return ranks


@functools.cache
def get_tokenizer(name: str) -> Tokenizer:
    """Returns the tokenizer called `name`: gpt2, bytes, gpt2-chat or bytes-chat."""
    if name in ("gpt2", "gpt2-chat"):
        return GPT2Tokenizer(chat=name.endswith("-chat"))
    if name in ("bytes", "bytes-chat"):
        return ByteTokenizer(chat=name.endswith("-chat"))
    raise UserError(f"unknown tokenizer {name!r}; choose one of {', '.join(TOKENIZERS)}")
