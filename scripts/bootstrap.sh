#!/usr/bin/env bash
# Set up a fresh machine for sparsetrain: a .venv with torch (CPU wheel where one lies on disk),
# the package with its test/plot extras, and the built-in Fashion-MNIST data (Debian package).
# Safe to run again: every step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "torch==2.13.0"
fi
.venv/bin/python -m pip install -q -e ".[dev]"

data=/usr/share/datasets/fashion-mnist
if [ ! -e "$data/train-images-idx3-ubyte.gz" ] && [ -z "${SPARSETRAIN_DATA:-}" ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist; } >/dev/null \
      || echo "bootstrap: could not install dataset-fashion-mnist; train with --data-dir DIR or let it download" >&2
  else
    echo "bootstrap: no apt-get; Fashion-MNIST will be read from --data-dir/\$SPARSETRAIN_DATA or downloaded" >&2
  fi
fi
echo "bootstrap: ready ($(.venv/bin/python -c 'import torch, sparsetrain; print("torch", torch.__version__, "sparsetrain", sparsetrain.__version__)'))"
