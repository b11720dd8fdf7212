#!/usr/bin/env bash
# First GPU smoke: pytest -m gpu, then bench_dpo at the 1B shape. Logs under $OUT.
set -u
OUT=${OUT:-gpu-check-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false ALIGN_CACHE_DIR=${ALIGN_CACHE_DIR:-$PWD/.gpucache}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft, accelerate, trl, datasets, bitsandbytes as b; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__, 'trl', trl.__version__, 'datasets', datasets.__version__, 'bnb', b.__version__)"
timeout ${PYTEST_S:-120} python3 -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors tests 2>&1 | tee "$OUT/pytest.log"
timeout ${BENCH_S:-180} python3 recipes/bench_dpo.py --shape llama-1b --data synthetic --json "$OUT/bench_1b.json" 2>&1 \
  | grep -v "it/s\]" | tee "$OUT/bench_1b.log"
