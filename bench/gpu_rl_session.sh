#!/usr/bin/env bash
# The online-RL checks of one device session, as one script (about 8 minutes on one H100 or H200, each step under a
# timeout): run from the repository root on the GPU machine. Prepare here first (no network there):
#   1. .gpu/model: SmolLM2-135M's config and tokenizer, no weights (random weights are built there):
#        .venv/bin/python -c "import models, shutil, pathlib; s = models.smollm2_folder(); d = pathlib.Path('.gpu/model'); \
#          d.mkdir(parents=True, exist_ok=True); [shutil.copy(p, d) for p in s.iterdir() if p.suffix != '.safetensors']"
#   2. .gpu/wheels: what the machine lacks (datasets, dill, multiprocess, math-verify, latex2sympy2_extended,
#      antlr4-python3-runtime, trl), downloaded as in the device tool's README (--no-deps, cp312, manylinux).
#   3. carry .gpu; results land in $OUT (gpu-rl-session.log, rl_throughput_gpu.json, rl_throughput_gpu_eager.json).
set -uo pipefail
OUT=${OUT:-runs/gpu-rl-session}
source bench/gpu_prelude.sh gpu-rl-session.log  # wheels, offline env, log and step(), /tmp/smollm2-random

step "0. machine and versions"
versions torch transformers trl pytorch_lightning datasets pyarrow

step "1. online RL on the GPU: CUDA-graph decoding matches the dynamic path; the toy task learns (bf16, reward models there)"
timeout 150 python3 -m pytest -q -m gpu tests/test_gpu.py -k "cuda_graph or online_rl_learns" -p no:cacheprovider 2>&1 \
  | grep -vE "Warning|warn|^\s*$|^tests/" | tail -12 | tee -a "$log"

bench=(python3 bench/rl_throughput.py --model-name /tmp/smollm2-random --device cuda --reward coin --prompts-per-step 16
       --num-generations 8 --max-new-tokens 128 --steps 5 --warmup-steps 1)
step "2. bench/rl_throughput.py on the GPU: ours (CUDA graphs) against TRL RLOOTrainer and GRPOTrainer (coin reward, fp32)"
timeout 300 "${bench[@]}" --out "$OUT/rl_throughput_gpu.json" 2>&1 | grep -vE "Warning|warn\(|^\s*$" | tail -14 | tee -a "$log"
step "3. the same, ours without CUDA graphs (the baseline of the speed-up, same machine)"
timeout 100 "${bench[@]}" --trl "" --cuda-graphs off --out "$OUT/rl_throughput_gpu_eager.json" 2>&1 \
  | grep -vE "Warning|warn\(|^\s*$" | tail -4 | tee -a "$log"
step "done"
