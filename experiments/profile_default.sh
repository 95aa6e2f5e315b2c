#!/usr/bin/env bash
# Record the shipped profiling data set of the default pair (speckv_env/data/traces/):
# 4 tasks x {fp32, int8, nf4} x prompts, 128 new tokens, greedy and temperature 0.7.
# Crash-safe and resumable: rerun the same command to continue after an interruption.
# Usage: experiments/profile_default.sh [OUT] [extra speckv profile args...]
set -euo pipefail
OUT=${1:-speckv_env/data/traces}
shift || true
exec speckv profile --out "$OUT" --compressions fp32,int8,nf4 --modes greedy,sample \
  --splits test,validation,train --n-train 40 --max-new-tokens 128 --threads 2 --resume "$@"
