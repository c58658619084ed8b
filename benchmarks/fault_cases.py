"""Issue 27's faults, rerun as a user meets them, on the tiny config: one row per case with the exit
code, stderr lines, seconds to exit, checkpoints kept and whether metrics.jsonl up to the latest
checkpoint equals an uninterrupted run's.

python benchmarks/fault_cases.py --data=SHARDS_DIR [--cases=lock,flip,...] [--repeat=5]
    [--out=/tmp/faults]

SHARDS_DIR: byte-tokenized shards with meta.json (python -m llmjax.prepare --tokenizer=bytes ...).
The full-disk case needs root (a 2 MB tmpfs). Last line: one JSON object (the rows).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
flags.DEFINE_string("data", None, "byte-tokenized shards with meta.json", required=True)
flags.DEFINE_string("out", "/tmp/llmjax_faults", "scratch folder (emptied)")
flags.DEFINE_list(
    "cases", "lock,flip,bad_id,full_disk,peer,peer0,sigterm_eval,memory", "cases to run"
)
flags.DEFINE_integer("repeat", 1, "runs of each timing-sensitive case (peer, peer0, sigterm_eval)")
FLAGS = flags.FLAGS
ARGS = [
    "--config=configs/tiny.py",
    "--config.train.steps=16",
    "--config.train.log_every=1",
    "--config.train.ckpt_every=4",
    "--config.train.eval_every=8",
    "--config.train.eval_batches=1",
]


def cmd(workdir: str, data: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "llmjax.main", *ARGS, f"--workdir={workdir}",
            f"--config.data.path={data}", *extra]  # fmt: skip


def env(**extra) -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, **extra)


def rows(workdir: str, upto: int) -> list:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    out = [json.loads(line) for line in open(path)]
    return [
        sorted((k, v) for k, v in r.items() if not k.startswith("perf/"))
        for r in out
        if r["step"] <= upto
    ]


def steps(workdir: str) -> list:
    folder = os.path.join(workdir, "checkpoints")
    return sorted(os.listdir(folder), key=lambda s: (len(s), s)) if os.path.isdir(folder) else []


def row(case, proc_rc, err, seconds, workdir, reference, note="", cut=()) -> dict:
    """`cut`: metrics (such as eval/loss) of the last checkpoint's step that a stop cut short,
    and that the resumed run logs first."""
    kept = steps(workdir)
    committed = [int(s) for s in kept if s.isdigit()]
    consistent = None
    if committed:
        last = committed[-1]
        want = [
            r
            for r in rows(reference, last)
            if not (dict(r)["step"] == last and set(cut) & set(dict(r)))
        ]
        consistent = rows(workdir, last) == want
    r = {
        "case": case,
        "exit": proc_rc,
        "stderr_lines": len(err.strip().splitlines()) if err.strip() else 0,
        "seconds": round(seconds, 1),
        "checkpoints": kept,
        "metrics_consistent": consistent,
        "line": err.strip().splitlines()[-1][:300] if err.strip() else "",
        "note": note,
    }
    print(json.dumps(r), flush=True)
    return r


def timed(args, **kw) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.time()
    p = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, **kw)
    return p, time.time() - t0


def until_line(proc: subprocess.Popen, prefix: str) -> None:
    for line in proc.stdout:
        if line.startswith(prefix):
            return
    raise RuntimeError(f"never printed {prefix!r}")


def main(argv) -> None:
    del argv
    out = FLAGS.out
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    ref = os.path.join(out, "reference")
    p, _ = timed(cmd(ref, FLAGS.data), env=env())
    assert p.returncode == 0, p.stderr
    results = []
    timed_cases = ("peer", "peer0", "sigterm_eval")
    runs = [(c, i) for c in FLAGS.cases for i in range(FLAGS.repeat if c in timed_cases else 1)]
    for case, i in runs:
        w = os.path.join(out, f"{case}{i or ''}")
        if case == "lock":
            first = subprocess.Popen(cmd(w, FLAGS.data), cwd=ROOT, env=env(), text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
            until_line(first, "step      2/")
            first.send_signal(signal.SIGSTOP)
            p, s = timed(cmd(w, FLAGS.data), env=env())
            first.send_signal(signal.SIGCONT)
            first.communicate()
            note = f"first trainer exit {first.returncode}; kept/metrics are the first's"
            results.append(row(case, p.returncode, p.stderr, s, w, ref, note))
        elif case == "flip":
            data = os.path.join(out, "flipped_data")
            shutil.copytree(FLAGS.data, data)
            with open(os.path.join(data, "train_000000.bin"), "r+b") as f:
                f.seek(-2000, os.SEEK_END)
                b = f.read(1)[0]
                f.seek(-1, os.SEEK_CUR)
                f.write(bytes([b ^ 1]))
            p, s = timed(cmd(w, data), env=env())
            results.append(row(case, p.returncode, p.stderr, s, w, ref))
        elif case == "bad_id":
            data = os.path.join(out, "bad_id_data")
            shutil.copytree(FLAGS.data, data)
            tokens = np.memmap(os.path.join(data, "val_000000.bin"), np.uint16, "r+", offset=1024)
            tokens[300] = 300  # in the second eval batch (the first compiles the step at start)
            tokens.flush()
            del tokens
            extra = ["--config.data.verify=off", "--config.train.eval_every=5"]
            p, s = timed(cmd(w, data, *extra, "--config.train.eval_batches=2"), env=env())
            results.append(row(case, p.returncode, p.stderr, s, w, ref, "met at run time"))
        elif case == "full_disk":
            mnt = os.path.join(out, "disk")
            os.makedirs(mnt)
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", mnt], check=True)
            try:
                wd = os.path.join(mnt, "w")
                p, s = timed(cmd(wd, FLAGS.data), env=env())
                results.append(row(case, p.returncode, p.stderr, s, wd, ref))
            finally:
                subprocess.run(["umount", "-l", mnt], check=True)
        elif case in ("peer", "peer0"):
            launch = ["bash", "launch/multiprocess_local.sh", "2", *cmd(w, FLAGS.data)[3:]]
            e = env(CPU_DEVICES_PER_PROCESS="1", PYTHON=sys.executable, PORT="23917")
            ref2 = os.path.join(out, "reference2")
            if not os.path.exists(ref2):
                r2 = subprocess.run(launch[:3] + cmd(ref2, FLAGS.data)[3:], cwd=ROOT, env=e,
                                    capture_output=True, text=True)  # fmt: skip
                assert r2.returncode == 0, r2.stderr
            proc = subprocess.Popen(launch, cwd=ROOT, env=e, text=True, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE)  # fmt: skip
            until_line(proc, "step      6/")
            while not os.path.isdir(os.path.join(w, "checkpoints", "4")):  # committed
                time.sleep(0.05)
            victim = "1" if case == "peer" else "0"
            pids = subprocess.run(["pgrep", "-f", f"workdir={w} .*process_id={victim}"],
                                  capture_output=True, text=True).stdout.split()  # fmt: skip
            os.kill(int(pids[0]), signal.SIGKILL)
            t0 = time.time()
            _, err = proc.communicate()
            while subprocess.run(["pgrep", "-f", f"workdir={w} "]).returncode == 0:
                time.sleep(0.1)
            s = time.time() - t0
            note = f"process {victim} SIGKILLed (launch/multiprocess_local.sh); until none is left"
            results.append(row(case, proc.returncode, err, s, w, ref2, note))
        elif case == "sigterm_eval":
            proc = subprocess.Popen(cmd(w, FLAGS.data, "--config.train.eval_batches=3000"),
                                    cwd=ROOT, env=env(), text=True, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE)  # fmt: skip
            until_line(proc, "step      8/16 | loss")
            time.sleep(1.0)
            proc.send_signal(signal.SIGTERM)
            t0 = time.time()
            _, err = proc.communicate()
            s = time.time() - t0
            results.append(
                row(
                    case,
                    proc.returncode,
                    err,
                    s,
                    w,
                    ref,
                    "eval of step 8: redone on resume",
                    ["eval/loss"],
                )
            )
        elif case == "memory":
            p, s = timed(cmd(w, FLAGS.data, "--config.data.batch_size=524288"), env=env())
            note = "seconds: mostly compiling"
            results.append(row(case, p.returncode, p.stderr, s, w, ref, note))
    print(json.dumps(results))


if __name__ == "__main__":
    app.run(main)
