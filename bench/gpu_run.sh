#!/usr/bin/env bash
# The one command a lent GPU machine runs (device tool, from the repo root, with `.whl` carried): install the
# carried wheels (diffusers, hydra-core, omegaconf, antlr4, peft; torch/transformers/accelerate are on the machine),
# then every measurement of bench/gpu_session.py within BUDGET seconds; results land in $OUT.
set -u -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 3
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
python3 bench/gpu_session.py --budget "${BUDGET:-520}" --out "${OUT:-/tmp/out}" "$@" 2>&1 | tee "${OUT:-/tmp/out}/log.txt"
