#!/usr/bin/env bash
# Cloud TPU VM pod: create it, install this project (with the `tpu` extra) on every worker, run a
# config on all workers at once (TOKPOST_DISTRIBUTED=1: jax.distributed reads the pod from the
# TPU metadata), and delete it. DRY_RUN=1 prints the gcloud commands instead of running them.
#
#   launch/tpu_pod.sh [options] create
#   launch/tpu_pod.sh [options] setup                       # git clone (--repo) or copy this tree
#   launch/tpu_pod.sh [options] run CONFIG[:ARG] WORKDIR [--config.field=value ...]
#   launch/tpu_pod.sh [options] pipeline CONFIG[:ARG] WORKDIR [--config.field=value ...]
#   launch/tpu_pod.sh [options] ssh 'COMMAND'               # any command, on every worker
#   launch/tpu_pod.sh [options] delete
#
# Example (RobusTok main training on a v5e-256, ImageNet and the weights on GCS/local disk):
#   launch/tpu_pod.sh --name=robustok --zone=us-west4-a --accelerator-type=v5litepod-256 \
#       --project=my-project create
#   launch/tpu_pod.sh --name=robustok --zone=us-west4-a --project=my-project \
#       --repo=https://github.com/OWNER/tokpost_jax.git --ref=main setup
#   launch/tpu_pod.sh --name=robustok --zone=us-west4-a --project=my-project \
#       run configs/robustok_imagenet.py gs://bucket/robustok --config.data.data_dir=gs://bucket/tfds
set -euo pipefail

usage() {
  cat >&2 <<'EOF'
usage: launch/tpu_pod.sh [options] {create|setup|run|pipeline|ssh|delete} [args...]
options (or the environment variable in brackets):
  --name=NAME               TPU VM name                          [TPU_NAME]          (required)
  --zone=ZONE               e.g. us-west4-a, us-central2-b       [ZONE]              (required)
  --project=PROJECT         GCP project                          [PROJECT]           (gcloud's default)
  --accelerator-type=TYPE   e.g. v5litepod-256, v4-64, v6e-256   [ACCELERATOR_TYPE]  (create)
  --version=RUNTIME         TPU VM runtime; default from the type [RUNTIME_VERSION]
  --repo=GIT_URL            setup: clone this; empty: copy the   [REPO_URL]
                            current git tree (git archive HEAD)
  --ref=REF                 setup: branch/tag/commit (default main) [REPO_REF]
  --spot                    create: a Spot TPU                   [SPOT=1]
commands:
  create                    gcloud compute tpus tpu-vm create
  setup                     venv + pip install -e '.[tpu]' on all workers
  run CONFIG WORKDIR [...]  python -m tokpost_jax.main on all workers (overrides passed through)
  pipeline CONFIG WORKDIR [...]  python -m tokpost_jax.pipeline likewise
  ssh 'COMMAND'             run COMMAND on all workers (in the project directory, venv active)
  delete                    gcloud compute tpus tpu-vm delete
DRY_RUN=1 prints the commands instead of running them.
EOF
  exit 2
}

name="${TPU_NAME:-}"; zone="${ZONE:-}"; project="${PROJECT:-}"
accel="${ACCELERATOR_TYPE:-}"; version="${RUNTIME_VERSION:-}"
repo="${REPO_URL:-}"; ref="${REPO_REF:-main}"; spot="${SPOT:-}"
while [[ $# -gt 0 && "$1" == --* ]]; do
  case "$1" in
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --accelerator-type=*) accel="${1#*=}" ;;
    --version=*) version="${1#*=}" ;;
    --repo=*) repo="${1#*=}" ;;
    --ref=*) ref="${1#*=}" ;;
    --spot) spot=1 ;;
    --help|-h) usage ;;
    *) echo "unknown option: $1" >&2; usage ;;
  esac
  shift
done
[[ $# -ge 1 ]] || usage
cmd="$1"; shift
[[ -n "$name" && -n "$zone" ]] || { echo "error: --name and --zone are required" >&2; usage; }

# Where the project and its venv live on every worker.
remote_dir='~/tokpost_jax'
remote_venv='~/tokpost_venv'

# The TPU VM software version that matches the accelerator (Cloud TPU docs, "TPU software versions").
default_version() {
  case "$1" in
    v6e*) echo "v2-alpha-tpuv6e" ;;
    v5litepod*|v5e*) echo "v2-alpha-tpuv5-lite" ;;
    v5p*) echo "v2-alpha-tpuv5" ;;
    *) echo "tpu-ubuntu2204-base" ;;  # v4, v3, v2
  esac
}

# One argument as a shell word: bare when safe, else in single quotes (copy-pasteable).
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    local sq="'\\''"
    printf "'%s'" "${1//\'/$sq}"
  fi
}

# Runs (or, with DRY_RUN=1, prints) one command.
go() {
  if [[ "${DRY_RUN:-}" == 1 ]]; then
    local out="" arg
    for arg in "$@"; do out+="${out:+ }$(quote "$arg")"; done
    echo "$out"
  else
    "$@"
  fi
}

project_flag=()
[[ -n "$project" ]] && project_flag=("--project=$project")
where=("--zone=$zone" "${project_flag[@]}")

on_all_workers() {  # one remote shell command on every worker, at the same time
  go gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker=all --command="$1"
}

# The training command, quoted for the remote shell, with the multi-host switch on.
train_command() {
  local module="$1"; shift
  local config="$1" workdir="$2"; shift 2
  local line
  line="cd $remote_dir && . $remote_venv/bin/activate && export TOKPOST_DISTRIBUTED=1"
  line+=" TF_CPP_MIN_LOG_LEVEL=2 && python -m $module"
  line+=" $(printf '%q' "--config=$config") $(printf '%q' "--workdir=$workdir")"
  for arg in "$@"; do line+=" $(printf '%q' "$arg")"; done
  echo "$line"
}

case "$cmd" in
  create)
    [[ -n "$accel" ]] || { echo "error: create needs --accelerator-type" >&2; usage; }
    [[ -n "$version" ]] || version="$(default_version "$accel")"
    spot_flag=()
    [[ -n "$spot" ]] && spot_flag=(--spot)
    go gcloud compute tpus tpu-vm create "$name" "${where[@]}" \
      "--accelerator-type=$accel" "--version=$version" "${spot_flag[@]}"
    ;;
  setup)
    if [[ -n "$repo" ]]; then
      fetch="(test -d $remote_dir/.git || git clone $(printf '%q' "$repo") $remote_dir)"
      fetch+=" && cd $remote_dir && git fetch --all --tags && git checkout $(printf '%q' "$ref")"
      fetch+=" && (git pull --ff-only || true)"
    else
      # This tree's HEAD, copied to every worker (uncommitted changes are not included).
      tarball="${TMPDIR:-/tmp}/tokpost_jax_$$.tar.gz"
      go git -C "$(dirname "$0")/.." archive --format=tar.gz -o "$tarball" HEAD
      go gcloud compute tpus tpu-vm scp "$tarball" "$name:tokpost_jax.tar.gz" "${where[@]}" \
        --worker=all
      fetch="mkdir -p $remote_dir && tar -xzf ~/tokpost_jax.tar.gz -C $remote_dir && cd $remote_dir"
    fi
    install="python3 -m venv $remote_venv && . $remote_venv/bin/activate"
    install+=" && pip install -q --upgrade pip && pip install -q -e '.[tpu]'"
    install+=" && python -c 'import jax, tokpost_jax; print(\"jax\", jax.__version__)'"
    on_all_workers "set -e; $fetch && $install"
    ;;
  run|pipeline)
    # Checked here, not in train_command: an exit inside $(...) would not stop this script.
    [[ $# -ge 2 ]] || { echo "error: $cmd needs CONFIG[:ARG] WORKDIR [--config.x=y ...]" >&2; usage; }
    module=tokpost_jax.main
    [[ "$cmd" == pipeline ]] && module=tokpost_jax.pipeline
    on_all_workers "$(train_command "$module" "$@")"
    ;;
  ssh)
    [[ $# -eq 1 ]] || { echo "error: ssh needs one quoted COMMAND" >&2; usage; }
    on_all_workers "cd $remote_dir && . $remote_venv/bin/activate && $1"
    ;;
  delete)
    go gcloud compute tpus tpu-vm delete "$name" "${where[@]}" --quiet
    ;;
  *)
    echo "unknown command: $cmd" >&2
    usage
    ;;
esac
