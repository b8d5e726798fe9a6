#!/usr/bin/env bash
# Debug on one CUDA GPU: install `.[gpu]` into a virtual environment and train `configs/debug_gpu.py`
# (DINOv2 ViT-L/14 + Llama-2-7B frozen in bf16, LoRA in f32) sized for the GPU's memory.
#
#   launch/gpu.sh --text /ckpt/Llama-2-7b-hf [--vision /ckpt/dinov2-large] [--size 24gb|80gb]
#                 [--workdir runs/debug_gpu] [--venv .venv-gpu] [--dry-run] [-- LEXVLA_TRAIN_ARGS...]
#
# --text is a local Hugging Face Llama 2 directory; its tokenizer.model is the tokenizer. Pass
# --random-text instead to keep Llama's shapes with random weights (then --tokenizer is needed).
# --size defaults to 80gb on GPUs with at least 70 GiB, else 24gb. --dry-run prints every command.
set -euo pipefail

SCRIPT_NAME=gpu.sh
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

TEXT="" VISION="" TOKENIZER="" SIZE="" WORKDIR="runs/debug_gpu" VENV="$REPO/.venv-gpu" PYTHON="${PYTHON:-python3.11}"
RANDOM_TEXT=0
TRAIN_ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --text) need_value "$@"; TEXT="$2"; shift 2 ;;
    --vision) need_value "$@"; VISION="$2"; shift 2 ;;
    --tokenizer) need_value "$@"; TOKENIZER="$2"; shift 2 ;;
    --random-text) RANDOM_TEXT=1; shift ;;
    --size) need_value "$@"; SIZE="$2"; shift 2 ;;
    --workdir) need_value "$@"; WORKDIR="$2"; shift 2 ;;
    --venv) need_value "$@"; VENV="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

if [[ -z "$TEXT" && "$RANDOM_TEXT" == 0 ]]; then
  die "pass --text DIR (a local Llama-2-7b-hf directory) or --random-text with --tokenizer FILE"
fi
[[ -z "$TOKENIZER" ]] && TOKENIZER="$TEXT"
[[ -n "$TOKENIZER" ]] || die "--random-text needs --tokenizer (Llama 2's tokenizer.model)"
if [[ "$DRY_RUN" == 0 ]]; then
  for path in "$TEXT" "$VISION" "$TOKENIZER"; do
    [[ -z "$path" || -e "$path" ]] || die "$path does not exist"
  done
fi
case "$SIZE" in
  "" | 24gb | 80gb) ;;
  *) die "--size must be 24gb or 80gb (got '$SIZE')" ;;
esac
require_command nvidia-smi "this script needs an NVIDIA GPU and its driver"
require_command "$PYTHON" "install Python 3.11 or set PYTHON=/path/to/python3.11"

# Memory of GPU 0 in MiB decides the size unless --size is given.
QUERY=(nvidia-smi --query-gpu=memory.total "--format=csv,noheader,nounits" --id=0)
if [[ -z "$SIZE" ]]; then
  run "${QUERY[@]}"
  if [[ "$DRY_RUN" == 1 ]]; then
    SIZE=24gb
  else
    mib="$("${QUERY[@]}")"
    SIZE=$([[ "${mib%%.*}" -ge 71680 ]] && echo 80gb || echo 24gb)
  fi
  echo "$SCRIPT_NAME: using configs/debug_gpu.py:$SIZE" >&2
fi

run "$PYTHON" -m venv "$VENV"
run "$VENV/bin/pip" install -q --upgrade pip
run "$VENV/bin/pip" install -q -e "${REPO}[gpu]"

OVERRIDES=(--config.data.tokenizer="$TOKENIZER")
[[ -n "$TEXT" ]] && OVERRIDES+=(--config.model.text_checkpoint="$TEXT")
[[ -n "$VISION" ]] && OVERRIDES+=(--config.model.vision_checkpoint="$VISION")
# XLA may take almost all of the GPU (its default is 75%); the 24gb setting needs it.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
echo "+ export XLA_PYTHON_CLIENT_MEM_FRACTION=$XLA_PYTHON_CLIENT_MEM_FRACTION"
run "$VENV/bin/lexvla" train --config "$REPO/configs/debug_gpu.py:$SIZE" --workdir "$WORKDIR" "${OVERRIDES[@]}" \
  ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}
