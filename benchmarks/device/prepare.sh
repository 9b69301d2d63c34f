#!/usr/bin/env bash
# Run on your own (CPU, networked) machine, from the project root, before a GPU run.
# Downloads into the git-ignored .device/whl the wheels the GPU image lacks (or has in another version);
# the GPU machine then runs `bash benchmarks/device/gpu_check.sh` from the project root, offline.
set -euo pipefail
[ -f pyproject.toml ] || { echo "run from the project root" >&2; exit 2; }
mkdir -p .device/whl
grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >> .git/info/exclude
plat="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $plat \
  -d .device/whl flax==0.12.12 omegaconf==2.3.0
python3 -m pip wheel -q --no-deps -w .device/whl antlr4-python3-runtime==4.9.3   # sdist only: build it here
du -sh .device
