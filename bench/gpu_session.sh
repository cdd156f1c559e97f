#!/usr/bin/env bash
# The GPU checks of one device session, as one script (10-13 minutes on one H100, each step under a timeout): run from the repository root
# on the GPU machine. Prepare here first (no network there):
#   1. .gpu/model: SmolLM2-135M's config and tokenizer, no weights (random weights are built there):
#        .venv/bin/python -c "import models, shutil, pathlib; s = models.smollm2_folder(); d = pathlib.Path('.gpu/model'); \
#          d.mkdir(parents=True, exist_ok=True); [shutil.copy(p, d) for p in s.iterdir() if p.suffix != '.safetensors']"
#   2. .gpu/wheels: the wheels the machine lacks (datasets, math-verify and its deps, deepspeed, ray, torchao,
#      Transformer Engine: docs/benchmarks.md, "Installing Transformer Engine"), within the 64 MiB carry limit.
#   3. carry .gpu; results land in $OUT (gpu-session.log, throughput JSON files).
set -uo pipefail
OUT=${OUT:-runs/gpu-session}
source bench/gpu_prelude.sh gpu-session.log  # wheels, offline env, log and step(), /tmp/smollm2-random
run=(python3 train.py --model-name /tmp/smollm2-random --dataset-name synthetic-math --train-dataset-length 3200
     --batch-size 16 --lr 3e-4 --max-length 256 --val-generate-samples 8 --max-new-tokens 32 --storage-path /tmp/gpu-runs
     --no-verbose --log-every-n-steps 25 --seed 42)

step "1. DeepSpeed ZeRO-3 to the end, final model gathered and reloaded"
timeout 150 "${run[@]}" --name zero3 --strategy deepspeed --zero-stage 3 --precision bf16-mixed --max-steps 60 2>&1 | tail -4 | tee -a "$log"
python3 -c "from transformers import AutoModelForCausalLM as M; m = M.from_pretrained('/tmp/gpu-runs/zero3/final_model');
print('reloaded', sum(p.numel() for p in m.parameters()), 'parameters')" 2>&1 | tail -1 | tee -a "$log"

step "2. --use-ray --strategy deepspeed, one GPU worker"
timeout 150 "${run[@]}" --name ray-ds --use-ray --use-gpu --num-workers 1 --strategy deepspeed --precision bf16-mixed \
  --max-steps 30 2>&1 | tail -4 | tee -a "$log"

step "3. --compile-head --activation-checkpointing: bf16 and TE FP8 against plain bf16 (200 steps each)"
i=0
for flags in "--precision bf16-true" "--precision bf16-true --compile-head --activation-checkpointing" \
             "--precision transformer-engine --fp8-recipe current --compile-head --activation-checkpointing"; do
  i=$((i + 1))
  timeout 120 "${run[@]}" --name "track-$i" --max-steps 200 $flags 2>&1 | grep -E "after training|Error|error" | tee -a "$log"
  python3 -c "import csv, glob
rows = [r for f in glob.glob('/tmp/gpu-runs/track-$i/csv/*/metrics.csv') for r in csv.DictReader(open(f)) if r.get('train/loss')]
print('$flags: train/loss every 25 steps', [round(float(r['train/loss']), 3) for r in rows])" 2>&1 | tail -1 | tee -a "$log"
done

step "4. Throughput at sequence length 2048: 0.5B and 1.5B (3B if time allows), bf16 vs torchao vs TE current"
for spec in qwen2.5-0.5b:16 qwen2.5-1.5b:8 qwen2.5-3b:4; do
  for backend in torchao te; do
    timeout 100 python3 bench/gpu_throughput.py --model "${spec%:*}" --kinds sft --seq-lens 2048 --checkpointing off \
      --micro-batches "${spec#*:}" --compile --compile-head --fp8-backend "$backend" --fp8-recipe current --steps 8 \
      --out "$OUT/throughput-${spec%:*}-$backend.json" 2>&1 | grep -E "^\||Error" | tee -a "$log"
  done
done
step "done"
