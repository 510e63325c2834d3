#!/usr/bin/env bash
# Download, HERE (where PyPI is reachable), the CPython 3.12 manylinux x86_64 wheels that the GPU
# machine (nvidia-h200: Python 3.12, torch, timm, scikit-image, ... but no registry) lacks, and
# build pneumomap's own wheel beside them, into the git-ignored folder .whl/ (or $WHL_DIR).
#
#   benchmarks/gpu_wheels.sh            # then name .whl in the device call's `carry`
#
# Every wheel is fetched with --no-deps and a pinned version (the versions this project's
# .venv runs), so the folder installs offline with
#   python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl
# (benchmarks/gpu_check.sh does that when the imports are missing). The script then checks that
# every requirement of every wheel is either in the folder or already on the device, and that
# the folder stays under $MAX_MIB MiB (the whole tree that travels must stay under 64 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
DEST=${WHL_DIR:-.whl}
MAX_MIB=${MAX_MIB:-50}

# what pneumomap needs that the device's python3 lacks (pyproject.toml's dependencies, less the
# device's package list), pinned; pylibjpeg-libjpeg adds pylibjpeg's JPEG (lossless, 12-bit) decoder
PINNED=(
  pydicom==3.0.2
  segmentation-models-pytorch==0.6.0
  pylibjpeg==2.1.0
  pylibjpeg-libjpeg==2.4.0
  pylibjpeg-openjpeg==2.6.0
  pylibjpeg-rle==2.2.0
  python-gdcm==3.2.6
)
# already on the device (its package list, as far as these wheels and pneumomap require them)
DEVICE_HAS="torch torchvision timm numpy scipy scikit-image joblib pyyaml tqdm safetensors pillow matplotlib
huggingface-hub setuptools"

rm -rf "$DEST"
mkdir -p "$DEST"
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d "$DEST" "${PINNED[@]}"
# pneumomap itself, from a copy of this checkout's package (pure Python: py3-none-any), so that the
# build leaves no build/ folder here
SRC=$(mktemp -d)
trap 'rm -rf "$SRC"' EXIT
cp -r pyproject.toml README.md pneumomap "$SRC"/
find "$SRC" -name __pycache__ -prune -exec rm -rf {} +
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$(cd "$DEST" && pwd)" "$SRC"

"$PY" - "$DEST" "$MAX_MIB" "$DEVICE_HAS" <<'EOF'
"""List the wheels, check their requirements are covered and the folder's size."""
import re
import sys
import zipfile
from pathlib import Path

dest, max_mib, device_has = Path(sys.argv[1]), float(sys.argv[2]), set(sys.argv[3].split())


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


wheels = sorted(dest.glob("*.whl"))
have = {norm(w.name.split("-")[0]) for w in wheels} | {norm(n) for n in device_has}
missing = []
for wheel in wheels:
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        text = zf.read(meta).decode()
    for line in text.splitlines():
        if line.startswith("Requires-Dist:") and "extra ==" not in line:
            name = norm(re.split(r"[ ;<>=!~\[(]", line.split(":", 1)[1].strip())[0])
            if name not in have:
                missing.append(f"{wheel.name} needs {name}")
    print(f"{wheel.stat().st_size / 2**20:7.2f} MiB  {wheel.name}")
total = sum(w.stat().st_size for w in wheels) / 2**20
print(f"{total:7.2f} MiB  total, {len(wheels)} wheels in {dest}/")
if missing:
    sys.exit("gpu_wheels.sh: requirements neither in the folder nor on the device: " + "; ".join(missing))
if total > max_mib:
    sys.exit(f"gpu_wheels.sh: {total:.1f} MiB is over the {max_mib:g} MiB allowed (the tree that travels: 64 MiB)")
EOF
