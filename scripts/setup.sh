#!/usr/bin/env bash
# Set up dynnet on a fresh machine: the Fashion-MNIST Debian package, a virtual environment with
# PyTorch + torchvision, and dynnet itself (editable, with its test extras).
#
#   DYNNET_VENV   where to create the environment (default: .venv). CI points it at a cache keyed
#                 by a hash of the requirements; .venv then links to it.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${DYNNET_VENV:-.venv}"
TORCH_PINS=("torch==2.14.1" "torchvision==0.29.1")

# 1. The default dataset (Debian package; files under /usr/share/datasets/fashion-mnist).
if [ ! -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] installing dataset-fashion-mnist"
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "[setup] Fashion-MNIST is missing: run 'sudo apt-get install -y dataset-fashion-mnist'," \
         "or let dynnet download it with download=True" >&2
  fi
fi

# 2. The virtual environment (reused when it already has this project's requirements).
stamp_want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.dynnet-stamp" 2>/dev/null)" != "$stamp_want" ]; then
  echo "[setup] creating $VENV"
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "${TORCH_PINS[@]}"
  "$VENV/bin/python" -m pip install -q -e ".[test,tensorboard]"
  echo "$stamp_want" > "$VENV/.dynnet-stamp"
else
  # The environment may come from another checkout: point the editable install here.
  "$VENV/bin/python" -m pip install -q --no-deps -e .
fi
if [ "$VENV" != ".venv" ]; then
  ln -sfn "$VENV" .venv
fi
# 3. The compiled CPU kernels (C++, built once per source into ~/.cache/dynnet/native; needs g++). Without a
#    compiler dynnet runs its pure-PyTorch kernels: same results, slower; the line says why.
.venv/bin/python -c 'from dynnet.kernels import native; print("[setup] compiled kernels:", native.status())' 2>/dev/null \
  || echo "[setup] compiled kernels: not built"
echo "[setup] ready: $(.venv/bin/python -c 'import torch, dynnet; print("torch", torch.__version__, "dynnet", dynnet.__version__)')"
