#!/usr/bin/env bash
# Wheels for the lent GPU machine, built here, where the package registry answers.
#
# That machine has no network and an image with Python 3.12 and torch, but no DeepSpeed, pydantic,
# hjson, webdataset or open_clip: what tcjepa's training loop imports. This puts them into DEST
# (default .whl, which git ignores), at the versions installed here, so that the GPU runs the code
# the test suite ran:
#
#     bash benchmarks/gpu_wheels.sh [DEST]
#
# and benchmarks/gpu_session.sh installs them there (name DEST in the device call's carry).
# Pure-Python packages are built as wheels (DeepSpeed's ops stay JIT, DS_BUILD_OPS=0); the one
# binary dependency, pydantic-core, is downloaded for CPython 3.12 on manylinux x86-64.
set -euo pipefail
dest=${1:-.whl}
py=${PYTHON:-python3}
pyver=${GPU_PYTHON_VERSION:-3.12}

version() { "$py" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }

mkdir -p "$dest"
pure=()
for name in deepspeed hjson webdataset braceexpand open_clip_torch ftfy wcwidth pydantic annotated-types typing-inspection; do
    pure+=("$name==$(version "$name")")
done
echo "building ${pure[*]}"
DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps -w "$dest" "${pure[@]}"
core="pydantic-core==$(version pydantic-core)"
echo "downloading $core for CPython $pyver"
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
    -d "$dest" "$core"
du -sh "$dest"
ls "$dest"
