#!/usr/bin/env bash
# The GPU path in one go (issue 16): benchmarks/gpu_check.py's steps (see its docstring), after
# making pneumomap's imports work on a machine that reaches no package registry.
#
#   benchmarks/gpu_check.sh [--smoke] [--n N] [--work DIR] [--budget SECONDS]
#
# Python: $PYTHON, else .venv/bin/python when there is one, else python3 (a GPU machine's).
# When pydicom, segmentation-models-pytorch, pylibjpeg (+ openjpeg, rle) or gdcm do not import and
# the folder .whl/ holds wheels (benchmarks/gpu_wheels.sh downloads them where pip works), they are
# installed offline into /tmp/site (pneumomap's own wheel too) and put on PYTHONPATH, after this
# checkout, whose pneumomap is the one checked. Without a GPU the CPU-sized smoke run (under a minute).
# One summary table is printed; the rows go as JSON to $OUT/gpu_check.json when OUT is set.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
NEEDED="import pydicom, segmentation_models_pytorch, pylibjpeg, openjpeg, rle, gdcm"
SITE=""
if ! "$PY" -c "$NEEDED" 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "gpu_check.sh: $PY cannot $NEEDED and there is no .whl/ folder: run benchmarks/gpu_wheels.sh" \
         "where pip works and carry .whl along" >&2
    exit 2
  fi
  SITE=/tmp/site
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || { echo "gpu_check.sh: installing .whl/*.whl into $SITE failed" >&2; exit 2; }
fi
export PYTHONPATH="$PWD${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
"$PY" -c "$NEEDED" || { echo "gpu_check.sh: the imports still fail (PYTHONPATH=$PYTHONPATH)" >&2; exit 2; }
exec "$PY" benchmarks/gpu_check.py "$@"
