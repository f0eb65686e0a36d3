#!/usr/bin/env bash
# The ITKInfer Slicer module's logic (slicer/ITKInfer/ITKInferLib), for real, headless:
# slicer-core (Slicer's MRML scene, volume, storage and segmentation nodes as a wheel) in its
# own virtual environment, because it pins its own VTK. tests/slicer then starts a real
# `itk_infer serve` from the MAIN environment (ITK_INFER_PYTHON, default: the python on PATH,
# which must have this project's test and server dependencies, as after .ci/run's install
# step) and compares the segmentation with the command line's label map. Needs Python 3.11
# and pip; about 1 to 2 minutes. Removes its environment when done.
set -euo pipefail
cd "$(dirname "$0")/.."

main_python="${ITK_INFER_PYTHON:-$(command -v python)}"
"$main_python" -c "import itk_infer.server.app" # the server's extras must be installed

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"${PYTHON:-python3}" -m venv "$work/venv"
py="$work/venv/bin/python"

echo "== slicer: install slicer-core and pytest (nothing of itk_infer's own dependencies)"
"$py" -m pip --quiet --disable-pip-version-check install slicer-core==5.13.31053.0 "pytest>=8"

echo "== slicer: tests/slicer"
# --noconftest: tests/conftest.py imports the main environment's packages (SimpleITK).
ITK_INFER_PYTHON="$main_python" "$py" -m pytest -q -p no:cacheprovider --noconftest \
    tests/slicer
