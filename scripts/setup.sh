#!/usr/bin/env bash
# Idempotent set-up of fastdiff in ./.venv.
#   bash scripts/setup.sh          runtime only
#   bash scripts/setup.sh test     with the test dependencies (diffusers, scikit-learn, pytest, ...)
# The virtual environment sees the system's site-packages, so an existing (CUDA) torch is used as it is.
# Only where no torch is importable does it install the CPU build torch==2.13.0; torch is never pinned
# in a way that would replace a GPU user's build.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
extras=${1:-}

if [ ! -x .venv/bin/python ]; then
    "$python" -m venv --system-site-packages .venv
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    echo "setup: no torch found; installing torch==2.13.0"
    .venv/bin/python -m pip install --quiet torch==2.13.0
fi
spec="."
[ -n "$extras" ] && spec=".[$extras]"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e "$spec"
.venv/bin/python -c "import fastdiff, torch; print(f'setup: fastdiff {fastdiff.__version__} with torch {torch.__version__} in .venv')"
