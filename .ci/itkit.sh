#!/usr/bin/env bash
# ITKIT interoperability, for real: a fresh virtual environment with this project and ITKIT
# (PyPI `itkit`) installed as the README's "Models trained with ITKIT" says, then
# tests/itkit: a SemSeg3D trained two iterations by ITKIT's runner, its checkpoint written by
# MMEngine's CheckpointHook, run through `python -m itk_infer` and compared voxel for voxel
# with ITKIT's own predict. Needs Python 3.11 and pip only; 5 to 6 minutes on 2 cores (most of
# it installing ITKIT's dependencies). Removes its environment when done.
set -euo pipefail
cd "$(dirname "$0")/.."

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"${PYTHON:-python3}" -m venv "$work/venv"
py="$work/venv/bin/python"
pip=("$py" -m pip --quiet --disable-pip-version-check)

# The versions tested together (the README lists them). torch is pinned here too: itkit's
# dependencies (lightning, timm, torchio, onedl-mmcv[torch]) ask for a bare `torch`, which
# on a machine without one pulls a multi-GB CUDA build.
cat >"$work/constraints.txt" <<'EOF'
torch==2.13.0
itkit==4.0.0
onedl-mmengine==0.10.12
onedl-mmcv==2.3.6
onedl-mmsegmentation==1.4.2
monai==1.6.1
EOF

echo "== itkit: install itk_infer, then ITKIT with its OpenMMLab extras"
"${pip[@]}" install torch==2.13.0 -e .
"${pip[@]}" install -c "$work/constraints.txt" "itkit[advanced]" "pytest>=8"

# PyPI's torchvision is built against CUDA torch: with the CPU build it fails on import
# ("operator torchvision::nms does not exist"), and `import mmseg` imports it through timm.
# Nothing ITKIT's segmentors need at inference uses it.
if ! "$py" -c "import torchvision" >/dev/null 2>&1; then
    echo "torchvision does not import with this torch build: uninstalling it"
    "${pip[@]}" uninstall -y torchvision
fi

# ITKIT's onedl-mmengine and mmengine install the same `mmengine` folder; the documented
# install must leave exactly one of them.
if "$py" -m pip show mmengine >/dev/null 2>&1; then
    echo "error: both mmengine and onedl-mmengine are installed over one mmengine folder;" \
        "pyproject.toml must not require mmengine outside the 'mmengine' extra" >&2
    exit 1
fi

# Phase 1: without monai, which ITKIT's DiceCELoss_3D imports when the model is built, the run
# must stop with exit 2 naming the package.
if "$py" -c "import monai" >/dev/null 2>&1; then
    "${pip[@]}" uninstall -y monai
fi
echo "== itkit: tests without monai"
"$py" -m pytest -q -p no:cacheprovider tests/itkit

# Phase 2: with monai: train, infer, compare.
"${pip[@]}" install -c "$work/constraints.txt" monai
echo "== itkit: tests with monai"
"$py" -m pytest -q -p no:cacheprovider tests/itkit

# The alias and `python -m itk_infer` are this project's command even though ITKIT, installed
# last, owns the `itk_infer` script now.
"$work/venv/bin/itk-infer-batch" --version
