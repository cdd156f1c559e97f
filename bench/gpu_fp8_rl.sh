#!/usr/bin/env bash
# FP8 online RL on the GPU, as one script (about 4 minutes on one H100 or H200, each step under a timeout): installs
# Transformer Engine from carried packages, builds its PyTorch extension there, and runs the FP8 online-RL test.
# Run from the repository root on the GPU machine. Prepare here first (no network there):
#   1. .gpu/model and .gpu/wheels as for bench/gpu_rl_session.sh.
#   2. .gpu/te: Transformer Engine 2.20.2 for CUDA 13 (docs/benchmarks.md, "Installing Transformer Engine"): the core
#      wheel transformer-engine-cu13 with its GPU code for architectures other than sm_90 zeroed out (to fit the
#      64 MiB carry limit), transformer-engine, nvidia-cudnn-frontend, pydantic, pydantic-core, annotated-types,
#      typing-inspection, nvdlfw-inspect (wheels, cp312, manylinux) and the transformer_engine_torch sdist.
#   3. carry .gpu; the log lands in $OUT/gpu-fp8-rl.log.
set -uo pipefail
OUT=${OUT:-runs/gpu-fp8-rl}
source bench/gpu_prelude.sh gpu-fp8-rl.log  # wheels, offline env, log and step(), /tmp/smollm2-random

step "1. Transformer Engine: the carried wheels, then transformer_engine_torch built from its sdist for sm_90"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/te/*.whl 2>&1 | tail -2 | tee -a "$log"
include=$(python3 -c "import nvidia, pathlib
print(':'.join(str(p / 'include') for root in nvidia.__path__ for p in pathlib.Path(root).iterdir() if (p / 'include').is_dir()))")
mkdir -p /tmp/te-build && tar xzf .gpu/te/transformer_engine_torch-*.tar.gz -C /tmp/te-build
compgen -G "/tmp/te-build/transformer_engine_torch-*/dist/*.whl" >/dev/null || (cd /tmp/te-build/transformer_engine_torch-* && CPATH="$include" NVTE_PYTORCH_FORCE_BUILD=TRUE NVTE_WITH_NCCL_EP=0 \
   NVTE_CUDA_ARCHS=90 MAX_JOBS=16 timeout 240 python3 setup.py -q bdist_wheel 2>&1 | grep -iE "error|warning: no" | tail -8) \
  | tee -a "$log"
# unpacked, not pip-installed: pip --target skips a package folder that exists (transformer_engine/, from the core)
python3 -m zipfile -e /tmp/te-build/transformer_engine_torch-*/dist/*.whl /tmp/site 2>&1 | tail -2 | tee -a "$log"
python3 -c "import precision; te = precision.import_te(); import transformer_engine
print('transformer_engine', transformer_engine.__version__, 'imported with its PyTorch extension')" 2>&1 | tail -2 | tee -a "$log"

step "2. online RL under --precision transformer-engine --fp8-recipe current (the toy task, CUDA-graph decoding)"
timeout 180 python3 -m pytest -q -m gpu tests/test_gpu.py -k "transformer_engine_fp8" -p no:cacheprovider -rs 2>&1 \
  | grep -vE "Warning|warn|^\s*$|^tests/" | tail -25 | tee -a "$log"
step "done"
