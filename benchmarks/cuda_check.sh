#!/usr/bin/env bash
# The CUDA check on a bare GPU machine without network: stage the carried part of the pack (made here by
# `python -m benchmarks.cuda_check_pack pack`); once every part is in, run python3 -m benchmarks.cuda_check on the GPU.
# The same command for every call; each call carries the next .cuda-check/part-K.
# rc 3: parts still to come; 2: no usable GPU or CUDA build; 1: a stage of the check failed; 0: all passed.
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${CUDA_CHECK_STAGE:-/tmp/hf2mlflow-cuda-check}
python3 -m benchmarks.cuda_check_pack stage --into "$stage" --parts "${CUDA_CHECK_PARTS:-.cuda-check}" || exit $?
site="$stage/site"
export PYTHONPATH="$site:$PWD" PATH="$site/bin:$PATH" HF2MLFLOW_HOME="$stage/home" HF_HUB_OFFLINE=1
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1
libs=$(python3 -m benchmarks.cuda_check_pack library-path --site "$site")
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
exec python3 -m benchmarks.cuda_check --out "${OUT:-$stage/out}" "$@"
