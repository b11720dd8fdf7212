#!/usr/bin/env bash
# The GPU check: one command, at most --budget seconds (default 570), one markdown table.
#
#   make gpu-prepare                   # here, with network: wheels into .whl/, tokenizer into .gpucache/
#   make gpu-check                     # on the GPU machine (no network); ARGS=--dry-run lists the steps
#   recipes/gpu_check.sh [--dry-run] [--only STEP,...] [--out DIR] [--wheels DIR] [--budget SECONDS]
#
# Steps (each under `timeout`, cut to what is left of the budget; a step with under 20 s left is skipped):
#   pytest    pytest -m gpu: fast path in bf16 (sdpa dense, FlexAttention rows and padding-free) vs TRL,
#             gradients included; the plan picks FlexAttention; QLoRA SFT -> merge -> DPO on CUDA; Liger
#   bench-1b  bench_dpo at the 1B shape: stock TRL (a), tuned TRL (b), ours (c: cold cache, c-warm),
#             with the bf16 matmul ceiling: the figures the targets are judged on
#   bench-8b  bench_dpo at the 8B shape, QLoRA: stock TRL (a) and ours (c), each at its largest batch (<= 16)
#   bench-online-1b  bench_online at the 1B shape: our GRPO step vs TRL's GRPOTrainer (8 prompts x 4 x 40 tokens,
#             LoRA r 16, beta 0.04), responses/s and peak memory, and the group-advantage check
#   families  recipes/family_smoke.py (bf16 SFT -> DPO per model family), when it exists
#   bench-1b-more  ablations, against c in the same run: c-rows (one row per pair), c-sdpa (dense mask),
#             b-pf (TRL's padding_free), c-liger
# then the report (recipes/gpu_report.py): one table of every figure, the targets checked.
# Logs and JSON go to $OUT (if set) or --out (default gpu-check-out/). Missing trl, datasets, dill,
# multiprocess, bitsandbytes or liger-kernel are installed from the wheels (no network needed) into
# /tmp/site; the tokenizer of the tests comes from .gpucache/ (ALIGN_CACHE_DIR).
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT_DIR=${OUT:-$REPO/gpu-check-out}
WHEELS=$REPO/.whl
BUDGET=${GPU_CHECK_BUDGET_S:-570}
PY=${PYTHON:-python3}
SITE=${GPU_CHECK_SITE:-/tmp/site}
DRY=0
ONLY=""
STEPS="pytest bench-1b bench-8b bench-online-1b families bench-1b-more"
REPORT_RESERVE=15
MIN_STEP=20

usage() {  # the header comment
  awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "${BASH_SOURCE[0]}"
}

value() {  # the value of option $1, which must be there and not look like another option
  if [ $# -lt 2 ] || [ "${2#-}" != "$2" ]; then echo "gpu_check: $1 needs a value" >&2; exit 2; fi
}
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --only) value "$@"; ONLY=$2; shift ;;
    --out) value "$@"; OUT_DIR=$2; shift ;;
    --wheels) value "$@"; WHEELS=$2; shift ;;
    --budget) value "$@"; BUDGET=$2; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

case "$BUDGET" in ''|*[!0-9]*) echo "gpu_check: --budget: expected whole seconds, got '$BUDGET'" >&2; exit 2 ;; esac
if [ -n "$ONLY" ]; then
  for s in ${ONLY//,/ }; do
    case " $STEPS " in *" $s "*) ;; *) echo "gpu_check: --only: unknown step '$s' (steps: $STEPS)" >&2; exit 2 ;; esac
  done
  STEPS=${ONLY//,/ }
fi

# name -> seconds it may take at most (before the budget cuts it); step_command sets CMD to its command
declare -A LIMIT=([pytest]=110 [bench-1b]=120 [bench-8b]=150 [bench-online-1b]=90 [families]=45 [bench-1b-more]=40)
step_command() {
  case "$1" in
    pytest) CMD=("$PY" -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors
                 --junitxml="$OUT_DIR/pytest.xml" tests) ;;
    bench-1b) CMD=("$PY" recipes/bench_dpo.py --shape llama-1b --data synthetic --batch 8 --warmup 2 --steps 8
                   --variants a,c,c-warm,b --json "$OUT_DIR/bench_1b.json") ;;
    bench-8b) CMD=("$PY" recipes/bench_dpo.py --shape llama-8b --data synthetic --quantization 4bit --max-length 1024
                   --find-max-batch --batch 4 --max-batch 16 --warmup 1 --steps 2 --variants a,c
                   --json "$OUT_DIR/bench_8b.json") ;;
    bench-online-1b) CMD=("$PY" recipes/bench_online.py --shape llama-1b --warmup 1 --steps 3 --eval-prompts 0
                          --json "$OUT_DIR/bench_online_1b.json") ;;
    families) CMD=("$PY" recipes/family_smoke.py --json "$OUT_DIR/families.json") ;;
    bench-1b-more) CMD=("$PY" recipes/bench_dpo.py --shape llama-1b --data synthetic --batch 8 --warmup 2 --steps 6
                        --variants c,c-rows,c-sdpa,b-pf,c-liger --json "$OUT_DIR/bench_1b_more.json") ;;
  esac
}

if [ "$DRY" = 1 ]; then
  echo "gpu check (dry run): budget ${BUDGET} s, output in $OUT_DIR, wheels from $WHEELS"
  echo "prepare: install missing trl, datasets, dill, multiprocess, bitsandbytes, liger-kernel from $WHEELS into $SITE; ALIGN_CACHE_DIR=$REPO/.gpucache"
  for s in $STEPS; do
    if [ "$s" = families ] && [ ! -f "$REPO/recipes/family_smoke.py" ]; then
      echo "$s (<= ${LIMIT[$s]} s): skipped: recipes/family_smoke.py is not in this tree"
    else
      step_command "$s"
      echo "$s (<= ${LIMIT[$s]} s): ${CMD[*]}"
    fi
  done
  echo "report: $PY recipes/gpu_report.py $OUT_DIR"
  exit 0
fi

START=$(date +%s)
cd "$REPO" || exit 2

# ---------------------------------------------------------------- prepare: wheels, tokenizer, device
[ -d "$SITE" ] && export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
declare -A WHEEL_OF=([trl]=trl [datasets]=datasets [dill]=dill [multiprocess]=multiprocess [bitsandbytes]=bitsandbytes [liger_kernel]=liger_kernel)
missing=$("$PY" -c 'import importlib.util as u, sys; print(" ".join(m for m in sys.argv[1:] if u.find_spec(m) is None))' \
  trl datasets dill multiprocess bitsandbytes liger_kernel) || { echo "gpu_check: cannot run $PY" >&2; exit 2; }
if [ -n "$missing" ]; then
  wheels=() absent=()
  for m in $missing; do
    found=$(ls "$WHEELS/${WHEEL_OF[$m]}"-*.whl 2>/dev/null | head -1)
    if [ -n "$found" ]; then wheels+=("$found"); else absent+=("$m"); fi
  done
  if [ ${#absent[@]} -gt 0 ]; then
    echo "gpu_check: missing wheels: ${absent[*]} not installed and not in $WHEELS/; run 'make gpu-wheels' on a machine" \
         "with network and bring $WHEELS/ along" >&2
    exit 2
  fi
  echo "[gpu-check] installing ${missing} from $WHEELS into $SITE" >&2
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "${wheels[@]}" >&2 \
    || { echo "gpu_check: installing the wheels failed" >&2; exit 2; }
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -z "${ALIGN_CACHE_DIR:-}" ]; then
  if [ ! -f "$REPO/.gpucache/models/smollm2-135m-instruct/config.json" ]; then
    echo "gpu_check: .gpucache/models/smollm2-135m-instruct is missing (the tests' tokenizer); run 'make gpu-cache' here and bring .gpucache/" >&2
    exit 2
  fi
  export ALIGN_CACHE_DIR=$REPO/.gpucache
fi
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: no CUDA device visible to $PY" >&2
  exit 2
fi

mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}  # fewer fragmentation OOMs
"$PY" - "$OUT_DIR/env.json" <<'EOF' 2>/dev/null
import json, sys, importlib.metadata as md, torch
names = ["torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "liger-kernel", "triton"]
versions = {}
for n in names:
    try:
        versions[n] = md.version(n)
    except md.PackageNotFoundError:
        versions[n] = None
props = torch.cuda.get_device_properties(0)
json.dump({"gpu": props.name, "memory_gib": round(props.total_memory / 2**30, 1), "versions": versions}, open(sys.argv[1], "w"))
EOF
: > "$OUT_DIR/steps.tsv"

for s in $STEPS; do
  left=$(( BUDGET - ($(date +%s) - START) - REPORT_RESERVE ))
  limit=${LIMIT[$s]}
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$s" = families ] && [ ! -f recipes/family_smoke.py ]; then
    printf '%s\tskipped\t0\trecipes/family_smoke.py is not in this tree\n' "$s" >> "$OUT_DIR/steps.tsv"
    echo "[gpu-check] $s: skipped: recipes/family_smoke.py is not in this tree" >&2
    continue
  fi
  if [ "$limit" -lt "$MIN_STEP" ]; then
    printf '%s\tskipped\t0\tout of time (%s s left of the %s s budget)\n' "$s" "$left" "$BUDGET" >> "$OUT_DIR/steps.tsv"
    echo "[gpu-check] $s: skipped: out of time" >&2
    continue
  fi
  echo "[gpu-check] $s (<= ${limit} s) ..." >&2
  t0=$(date +%s)
  step_command "$s"
  timeout --kill-after=10 "$limit" "${CMD[@]}" > "$OUT_DIR/$s.log" 2>&1
  rc=$?
  took=$(( $(date +%s) - t0 ))
  case $rc in
    0) status=ok ;;
    124|137) status=timeout ;;
    *) status=failed ;;
  esac
  printf '%s\t%s\t%s\texit %s, limit %s s, log %s\n' "$s" "$status" "$took" "$rc" "$limit" "$s.log" >> "$OUT_DIR/steps.tsv"
  echo "[gpu-check] $s: $status in ${took} s (log: $OUT_DIR/$s.log)" >&2
done

"$PY" recipes/gpu_report.py "$OUT_DIR" --total-s $(( $(date +%s) - START )) --budget-s "$BUDGET"
