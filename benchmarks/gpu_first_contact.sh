#!/usr/bin/env bash
# The first time a GPU is lent: one run, under 8 minutes, everything under one output folder.
#
#   benchmarks/gpu_first_contact.sh [OUT]        # default OUT=runs/first_contact_<date>
#
# 1. installs llmjax with its cuda12 extra into the active Python (PYTHON, default python);
# 2. llmjax.plan for GPT-2 124M at batch 16: deviceless vs compiled on the real GPU (peak memory,
#    kernel launches), so the deviceless compile is checked against the real thing;
# 3. benchmarks/step_time.py at batch 16, 32, 64, dumping XLA's autotune results at batch 32 to
#    benchmarks/autotune/<gpu>_gpt2_124m.txt (kept in the repository: `llmjax.plan
#    --autotune_results=` then compiles exactly what this GPU runs);
# 4. benchmarks/compare_torch.py at the fastest batch;
# 5. summary.json: predicted (plan) next to measured (step_time) for each batch.
# Then copy the figures into benchmarks/NOTES.md ("Predicted vs measured") and the efficiencies
# they imply into llmjax/plan/roofline.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${1:-runs/first_contact_$(date +%Y%m%d_%H%M%S)}
mkdir -p "$OUT" benchmarks/autotune
exec > >(tee "$OUT/log.txt") 2>&1
step() { echo "== $(date +%T) $*"; }

step "GPU"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.csv"
case "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" in
  *H200*) GPU=h200 ;;
  *A100*) GPU=a100 ;;
  *) GPU=h100 ;;
esac
AUTOTUNE=benchmarks/autotune/${GPU}_gpt2_124m.txt
CFG=configs/gpt2_124m.py

step "install .[cuda12]"
timeout 150 "$PY" -m pip install -q -e ".[cuda12]"
"$PY" -c 'import jax; print(jax.__version__, jax.devices())' | tee "$OUT/jax.txt"

step "plan: deviceless vs on the device (batch 16)"
for where in deviceless on_device; do
  flag=$([ $where = on_device ] && echo --on_device || true)
  timeout 90 "$PY" -m llmjax.plan --config=$CFG --gpu=$GPU --config.data.batch_size=16 $flag \
    > "$OUT/plan_b16_$where.txt"
  tail -n 1 "$OUT/plan_b16_$where.txt" > "$OUT/plan_b16_$where.json"
done

step "step_time at batch 16, 32, 64"
for B in 16 32 64; do
  xla=""
  [ $B = 32 ] && xla="--xla_gpu_dump_autotune_results_to=$PWD/$AUTOTUNE"
  XLA_FLAGS="${XLA_FLAGS:-} $xla" timeout 100 "$PY" benchmarks/step_time.py --config=$CFG \
    --batch_size=$B --seq_len=1024 --steps=20 > "$OUT/step_time_b$B.txt" || true
  timeout 60 "$PY" -m llmjax.plan --config=$CFG --gpu=$GPU --config.data.batch_size=$B \
    | tail -n 1 > "$OUT/plan_b$B.json" || true
done
cp "$AUTOTUNE" "$OUT/" 2>/dev/null || echo "no autotune results were written"

BEST=$("$PY" - "$OUT" <<'EOF'
import json, sys
best = {}
for b in (16, 32, 64):
    try:
        last = open(f"{sys.argv[1]}/step_time_b{b}.txt").read().strip().splitlines()[-1]
        best[b] = json.loads(last).get("tokens_per_sec") or 0
    except (OSError, IndexError, ValueError):
        pass
print(max(best, key=best.get) if best else 16)
EOF
)
step "compare_torch at batch $BEST"
timeout 150 "$PY" benchmarks/compare_torch.py --config=$CFG --batch_size="$BEST" --seq_len=1024 \
  --steps=20 > "$OUT/compare_torch_b$BEST.txt" || true

step "summary"
"$PY" - "$OUT" <<'EOF' | tee "$OUT/summary.json"
import json, sys
out = sys.argv[1]

def last_json(path):
    try:
        return json.loads(open(path).read().strip().splitlines()[-1])
    except (OSError, IndexError, ValueError):
        return {}

dl, od = last_json(f"{out}/plan_b16_deviceless.json"), last_json(f"{out}/plan_b16_on_device.json")
keys = ("peak_memory_bytes", "kernel_launches", "flops_per_step", "hbm_bytes_per_step")
rows = {"deviceless_vs_device": {k: [dl.get(k), od.get(k)] for k in keys}}
for b in (16, 32, 64):
    p, m = last_json(f"{out}/plan_b{b}.json"), last_json(f"{out}/step_time_b{b}.txt")
    rows[f"b{b}"] = {"predicted": {k: p.get(k) for k in ("predicted_tokens_per_sec",
                                                         "peak_memory_bytes", "predicted_mfu")},
                     "measured": m}
print(json.dumps(rows, indent=1))
EOF
step "done: $OUT"
