#!/usr/bin/env bash
# Prepare the wheels that scripts/gpu_check.sh installs on a lent GPU machine, which has Python 3.12 and its own
# CUDA torch but none of c2seg's other needs and no network. Run here (with .venv set up), before the device run:
#
#   bash scripts/gpu_wheels.sh [DEST]        # DEST defaults to .whl/ (git-ignored); about 40 MB
#
# deepspeed is published as source only: it is built here as a pure-Python wheel. The others are cp312 manylinux
# wheels (or pure ones). The versions are those installed in .venv (the set the test suite passes with; the
# main ones are pinned by constraints.txt), so the GPU machine runs what CI runs. mlflow is not carried: the
# GPU runs turn tracking off (it imports only when tracking is on) and its wheels would not fit the 64 MiB carry.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.whl}
py=.venv/bin/python
# c2seg's imports the GPU image lacks, with their own requirements that it lacks
needed=(webdataset braceexpand rasterio affine cligj click-plugins zarr donfig google-crc32c numcodecs
        hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions)
version() { "$py" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$1"; }
pins=()
for name in "${needed[@]}"; do pins+=("$name==$(version "$name")"); done
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
mkdir -p "$dest"
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$dest" "${pins[@]}"
"$py" -m pip wheel -q --no-deps "deepspeed==$(version deepspeed)" -w "$dest"
ls "$dest"
du -sh "$dest"
