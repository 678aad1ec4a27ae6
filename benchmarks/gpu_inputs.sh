#!/usr/bin/env bash
# Fill .gpu/ (git-ignored) with what benchmarks/gpu_suite.sh needs on a GPU machine that cannot reach a network:
#   .gpu/data/  the four FashionMNIST *-ubyte.gz files (30 MB), copied from $FASHION_MNIST_DIR, Debian's
#               /usr/share/datasets/fashion-mnist or data/FashionMNIST/raw (gzipped there if needed);
#   .gpu/whl/   wheels of jsonargparse and its signature extras for Python 3.12, at the versions installed here
#               (the GPU image has torch, lightning, torchmetrics, tensorboard and matplotlib but not these).
# Run it here, on the machine with PyPI:   bash benchmarks/gpu_inputs.sh   (PYTHON: the interpreter to ask for
# the versions and to run pip; default .venv/bin/python, else python3). Then send .gpu with the working tree
# (the device tool: carry [".gpu"]) and run the suite there: bash benchmarks/gpu_suite.sh goals
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
mkdir -p .gpu/data .gpu/whl
files=(train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte)
for dir in "${FASHION_MNIST_DIR:-}" /usr/share/datasets/fashion-mnist data/FashionMNIST/raw; do
    [ -n "$dir" ] || continue
    found=1
    for f in "${files[@]}"; do [ -f "$dir/$f.gz" ] || [ -f "$dir/$f" ] || found=0; done
    [ $found = 1 ] || continue
    for f in "${files[@]}"; do
        if [ -f "$dir/$f.gz" ]; then cp "$dir/$f.gz" .gpu/data/; else gzip -c "$dir/$f" > ".gpu/data/$f.gz"; fi
    done
    echo "FashionMNIST: copied from $dir"
    break
done
[ "${found:-0}" = 1 ] || { echo "FashionMNIST not found: run 'make data' (Debian's dataset-fashion-mnist)" >&2; exit 1; }
pins=$("$py" - <<'PY'
from importlib.metadata import version
print(" ".join(f"{name}=={version(name)}" for name in ("jsonargparse", "docstring_parser", "typeshed_client")))
PY
)
rm -f .gpu/whl/*.whl
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl $pins
echo "wheels: $pins"
du -sh .gpu
