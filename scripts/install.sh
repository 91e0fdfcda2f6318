#!/usr/bin/env bash
# Installs csd_ray and everything its tests and the local demo need on a CPU machine.
# Order matters: torch 2.13.0 (the CPU build on this machine kind) goes in before anything that
# depends on torch, or pip resolves a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip"
$PIP install -q torch==2.13.0
echo "torch==2.13.0" > /tmp/csd_ray-torch-pin.txt
$PIP install -q -c /tmp/csd_ray-torch-pin.txt -e ".[test]"
python -c "import torch, ray, transformers; print(f'csd_ray install: torch {torch.__version__}, ray {ray.__version__}, transformers {transformers.__version__}')"
