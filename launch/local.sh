#!/usr/bin/env bash
# Runs a config on this machine (CPU or the local GPUs), resuming if WORKDIR already has checkpoints.
#   launch/local.sh configs/tokenizer.py:demo runs/tokenizer_demo [--config.optim.lr=5e-4 ...]
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG[:ARG] WORKDIR [--config.field=value ...]" >&2
  exit 2
fi
config="$1"; workdir="$2"; shift 2
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
# On GPUs let XLA grab memory as needed rather than 75% up front, so TF/eval can coexist.
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
exec python -m tokpost_jax.main --config="$config" --workdir="$workdir" "$@"
