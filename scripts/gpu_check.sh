#!/usr/bin/env bash
# One command that checks a GPU machine end to end (or, with --cpu, the same steps on the CPU, as CI
# runs it) and prints JSON lines: scripts/gpu_check.py says what each line measures.
#
#   bash scripts/gpu_check.sh [--cpu] [--out DIR]    # < 8 minutes on one H100 / H200
#   bash scripts/gpu_check.sh --fetch-wheels         # on a machine with network: fill scripts/wheels/
#
# The GPU image has Python 3.12, torch >= 2.11, Triton, transformers and safetensors but no network
# and none of hydra-core, omegaconf (and antlr4), which the trainer needs. They travel as wheels in
# scripts/wheels/ (git-ignored; about 1 MB), made on a machine with network by --fetch-wheels:
#   pip download --only-binary=:all: --no-deps --python-version 3.12 --platform manylinux_2_28_x86_64 \
#       -d scripts/wheels hydra-core==1.3.2 omegaconf==2.3.0 PyYAML
#   pip wheel --no-deps -w scripts/wheels antlr4-python3-runtime==4.9.3   # pure Python, no binary on PyPI
# and are installed (pip --no-index --target .cache/gpu_check_site, put on PYTHONPATH: the image's
# Python is left untouched) only when an import is missing. wandb, deepspeed and lm-eval are not
# needed: the checks log with logging.wandb.mode=disabled.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
WHEELS="${WHEELS:-scripts/wheels}"

if [ "${1:-}" = "--fetch-wheels" ]; then
    mkdir -p "$WHEELS"
    "$PY" -m pip download --quiet --only-binary=:all: --no-deps --python-version 3.12 \
        --platform manylinux_2_28_x86_64 -d "$WHEELS" hydra-core==1.3.2 omegaconf==2.3.0 PyYAML
    "$PY" -m pip wheel --quiet --no-deps -w "$WHEELS" antlr4-python3-runtime==4.9.3
    ls "$WHEELS"
    exit 0
fi

SITE=.cache/gpu_check_site
export PYTHONPATH="$PWD/$SITE${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import hydra, omegaconf, yaml" 2>/dev/null; then
    if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        echo "gpu_check.sh: hydra-core/omegaconf are missing and $WHEELS/ holds no wheels; fill it with" \
             "'bash scripts/gpu_check.sh --fetch-wheels' on a machine with network" >&2
        exit 2
    fi
    "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" --target "$SITE" hydra-core omegaconf \
        PyYAML antlr4-python3-runtime >&2
fi
exec "$PY" scripts/gpu_check.py "$@"
