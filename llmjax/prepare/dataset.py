"""The dataset directory that `prepare` writes, and its two records: prepare_state.json (the
checkpoint of an unfinished pass, which resumes only with the same options and shards that still
verify) and meta.json (the card of a finished dataset, which data.py reads).

Nothing already there is overwritten unless prepare started it: another dataset, or .bin shards
from elsewhere (llm.c's), are refused in one line.
"""

from __future__ import annotations

import glob
import json
import os
import sys

from llmjax.data import PREPARE_STATE
from llmjax.prepare.writer import file_sha256
from llmjax.shards import MAX_TOKENS, META_FILE, DataError, shard_bytes, shard_name

SPLITS = ("train", "val")


def new_state(options: dict) -> dict:
    """The state of a pass that has read nothing yet."""
    return {
        "options": options,
        "consumed": 0,
        "seconds": 0.0,
        "text_bytes": 0,
        "kept_bytes": 0,
        "documents": {
            "seen": 0,
            "kept": 0,
            "dropped_empty": 0,
            "dropped_duplicate": 0,
            "dropped_short": 0,
        },
        "splits": {s: {"shards": [], "partial": 0, "docs": 0} for s in SPLITS},
        "held": [],
    }


def write_json(out: str, name: str, obj: dict, indent: int | None = None) -> None:
    """Writes out/name whole or not at all (a crash leaves the previous version)."""
    tmp = os.path.join(out, name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=indent)
    os.replace(tmp, os.path.join(out, name))


def check_options(o: dict) -> None:
    """Options out of range are a DataError (one line, exit code 2)."""
    if not 0.0 <= o["val_fraction"] < 1.0:
        raise DataError(f"--val_fraction={o['val_fraction']} must be in [0, 1)")
    for key in ("val_docs", "min_chars", "max_docs", "max_tokens", "workers"):
        if o[key] < 0:
            raise DataError(f"--{key}={o[key]} must be >= 0")
    if not 1 <= o["shard_tokens"] <= MAX_TOKENS:
        raise DataError(f"--shard_tokens={o['shard_tokens']} must be in [1, 2**31)")


def resume_state(out: str, options: dict) -> dict | None:
    """The checkpoint of an unfinished run with the same options whose finished shards verify."""
    path = os.path.join(out, PREPARE_STATE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        state = json.load(f)
    if state["options"] != options:
        diff = [
            f"{k}={state['options'].get(k)!r}"
            for k in options
            if state["options"].get(k) != options[k]
        ]
        raise DataError(
            f"--out={out} holds an unfinished prepare with other options "
            f"({', '.join(diff)}); rerun it with those, or use an empty --out"
        )
    for split, st in state["splits"].items():
        for s in st["shards"]:
            p = os.path.join(out, s["name"])
            ok = (
                os.path.exists(p)
                and os.path.getsize(p) == shard_bytes(s["tokens"])
                and file_sha256(p) == s["sha256"]
            )
            if not ok:
                print(f"prepare: {p} does not match its checkpoint; starting over", file=sys.stderr)
                return None
        tmp = os.path.join(out, shard_name(split, len(st["shards"])) + ".tmp")
        if st["partial"] and not (
            os.path.exists(tmp) and os.path.getsize(tmp) >= shard_bytes(st["partial"])
        ):
            print(f"prepare: {tmp} is shorter than its checkpoint; starting over", file=sys.stderr)
            return None
    return state


def claim(out: str, options: dict) -> dict | None:
    """Refuses to overwrite a dataset we did not start; returns a finished identical run's meta."""
    meta_path = os.path.join(out, META_FILE)
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("options") == options:
            return meta
        raise DataError(
            f"--out={out} already holds a prepared dataset with other options; "
            "use another --out or delete it"
        )
    ours = os.path.exists(os.path.join(out, PREPARE_STATE))
    if not ours and glob.glob(os.path.join(out, "*.bin")):
        raise DataError(
            f"--out={out} holds .bin shards that prepare did not start; "
            "use another --out or delete them"
        )
    return None


def remove_stale(out: str, state: dict) -> None:
    """Shards and tails past the checkpoint (or of an abandoned run) would be read as data."""
    for split, st in state["splits"].items():
        keep = {s["name"] for s in st["shards"]}
        if st["partial"]:
            keep.add(shard_name(split, len(st["shards"])) + ".tmp")
        for path in glob.glob(os.path.join(out, f"{split}_*.bin*")):
            if os.path.basename(path) not in keep:
                os.remove(path)


def summary(meta: dict, out: str) -> str:
    """The data card printed at the end of a run."""
    d, o = meta["documents"], meta["options"]
    tokens = sum(meta["tokens"].values())
    secs = max(meta["seconds"], 1e-9)
    rows = [
        f"dataset    {out}",
        f"source     {meta['source']}",
        f"tokenizer  {meta['tokenizer']} (vocab {meta['vocab_size']:,}, EOT {meta['eot_id']})",
        f"documents  {d['seen']:,} seen, {d['kept']:,} kept"
        + (" (stopped at --max_docs/--max_tokens)" if meta["capped"] else ""),
        f"dropped    {d['dropped_empty']:,} empty or whitespace, {d['dropped_duplicate']:,} "
        f"duplicate{'' if o['dedup'] else ' (--dedup off)'}, {d['dropped_short']:,} under "
        f"--min_chars={o['min_chars']}",
        "",
        f"{'split':<6} {'documents':>12} {'tokens':>16} {'shards':>7} {'tokens/doc':>11}",
    ]
    for s in ("train", "val"):
        n, t = meta["documents"][s], meta["tokens"][s]
        rows.append(f"{s:<6} {n:>12,} {t:>16,} {len(meta['shards'][s]):>7} {t / max(n, 1):>11,.1f}")
    seen, kept = meta["text_bytes"]["seen"], meta["text_bytes"]["kept"]
    rows += [
        "",
        f"text       {seen / 1e6:,.1f} MB read, {kept / 1e6:,.1f} MB kept, "
        f"{kept / max(tokens - d['kept'], 1):.2f} bytes/token (EOTs aside)",
        f"time       {secs:,.1f}s ({tokens / secs:,.0f} tokens/s, {seen / secs / 1e6:,.1f} MB/s)",
    ]
    return "\n".join(rows)
