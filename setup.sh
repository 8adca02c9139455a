#!/usr/bin/env bash
# Set up unlearn-bench on a fresh machine: a virtual environment with the package and its test tools, and the
# Fashion-MNIST data (Debian package dataset-fashion-mnist) when it is missing and we are root.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "setup.sh: Python >= 3.11 is needed (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
  "$PYTHON" -m venv .venv
fi
# torch/torchvision are capped at the releases this project is tested with (<= 2.14.1 / 0.29.1).
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test]"

FMNIST=/usr/share/datasets/fashion-mnist
if [ -n "${BENCH_DATA_DIR:-}" ] || [ -f "$FMNIST/train-images-idx3-ubyte.gz" ]; then
  :
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "setup.sh: installing the Debian package dataset-fashion-mnist (about 31 MB)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; }
else
  echo "setup.sh: Fashion-MNIST not found in $FMNIST. Install it with 'sudo apt-get install dataset-fashion-mnist'," >&2
  echo "  or download the four IDX .gz files from github.com/zalandoresearch/fashion-mnist into a folder and" >&2
  echo "  export BENCH_DATA_DIR=that/folder (the unit tests do not need it)." >&2
fi
