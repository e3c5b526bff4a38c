#!/bin/sh
# Install samba-bids into a Python environment, exactly as the README does: every package from
# constraints.txt (the tested versions), PyTorch first.
#
# The one install recipe of the images: containers/Dockerfile and containers/samba-bids.def run
# it, and tests/test_containers.py replays it into a fresh virtual environment.
#
#   sh containers/install.sh SOURCE_DIR
#
# Environment:
#   PYTHON           the interpreter whose environment receives samba-bids (default: python3)
#   TORCH_INDEX_URL  extra package index holding the PyTorch build to install, e.g.
#                    https://download.pytorch.org/whl/cpu (CPU, the images' default) or
#                    https://download.pytorch.org/whl/cu128 (CUDA 12.8). A local build label
#                    (2.13.0+cpu, 2.13.0+cu128) still satisfies the torch==2.13.0 pin.
#                    Empty: only the configured indexes (pip.conf, PIP_* variables).
#   EXTRAS           optional extras to install, e.g. "test" (default: none)
set -eu

SRC=${1:?usage: install.sh SOURCE_DIR}
PYTHON=${PYTHON:-python3}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-}
EXTRAS=${EXTRAS:-}
CONSTRAINTS="$SRC/constraints.txt"

test -f "$CONSTRAINTS" || { echo "install.sh: $CONSTRAINTS not found" >&2; exit 66; }
"$PYTHON" -c 'import sys; assert sys.version_info[:2] >= (3, 11), "Python 3.11 or newer is required"'

TARGET="$SRC"
if [ -n "$EXTRAS" ]; then
    TARGET="$SRC[$EXTRAS]"
fi

# 1. PyTorch, at the version pinned in constraints.txt, from the chosen build's index.
if [ -n "$TORCH_INDEX_URL" ]; then
    "$PYTHON" -m pip install -c "$CONSTRAINTS" --extra-index-url "$TORCH_INDEX_URL" torch
else
    "$PYTHON" -m pip install -c "$CONSTRAINTS" torch
fi
# 2. samba-bids and everything else, at the tested versions.
"$PYTHON" -m pip install -c "$CONSTRAINTS" "$TARGET"
# 3. The installed command answers.
"$PYTHON" -m samba_pipeline.cli --version
