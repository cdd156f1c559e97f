# Sourced by bench/gpu_*.sh on the GPU machine, after they set OUT: installs the
# carried wheels (.gpu/wheels, if any), sets the offline environment, opens the log "$OUT/$1" with a step function,
# a versions function (the GPU, its driver, and the version of each Python package named), and, where .gpu/model was
# carried, builds /tmp/smollm2-random, SmolLM2-135M's architecture with random weights from it (config and tokenizer
# only: no weights travel within the 64 MiB limit; weights do not change speed).
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if compgen -G ".gpu/wheels/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .gpu/wheels/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
log="$OUT/$1"
step() { echo "=== $* ($(date +%T))" | tee -a "$log"; }
versions() {  # versions torch transformers ...: the GPU and the packages' versions into the log (a missing one fails)
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$log"
  python3 -c "import importlib, sys
print(' '.join(f'{m} {getattr(importlib.import_module(m), \"__version__\", \"?\")}' for m in sys.argv[1:]))" "$@" 2>&1 \
    | tail -2 | tee -a "$log"
}
[ -d .gpu/model ] && python3 -c "
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
import torch; torch.manual_seed(0)
AutoModelForCausalLM.from_config(AutoConfig.from_pretrained('.gpu/model')).save_pretrained('/tmp/smollm2-random')
AutoTokenizer.from_pretrained('.gpu/model').save_pretrained('/tmp/smollm2-random')" 2>&1 | tail -2 | tee -a "$log"
