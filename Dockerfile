# itk_infer code-location image: the core, the `itk_infer` CLI and the Dagster definitions
# (`itk_infer_assets`), served by `dagster code-server` by default. See README, "Container".
#
# Build arguments:
#   BASE_IMAGE   any image with Python >= 3.11 and its venv module as `python3`
#                (default: the official slim Python 3.11 image on Debian bookworm).
#   TORCH_SPEC   pip requirement for torch. The default takes PyPI's Linux build, which is the
#                CUDA one; e.g. `torch==2.13.0+cpu` with its wheel in WHEEL_DIR for a CPU image.
#   WHEEL_DIR    folder of the build context whose wheels pip may use (find-links); a
#                `constraints.txt` there pins versions. Default: deploy/wheels (empty).
#   EXTRA_REQUIREMENTS   more pip requirements installed beside the project (default: none).
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_NO_INDEX   handed to pip (PIP_NO_INDEX=1: offline
#                build from WHEEL_DIR alone). Build arguments show in `docker history`: keep
#                credentials out of them.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_SPEC="torch==2.13.0"
ARG WHEEL_DIR=deploy/wheels
ARG EXTRA_REQUIREMENTS=""
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_NO_INDEX

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/itk_infer \
    PATH=/opt/itk_infer/bin:$PATH \
    DAGSTER_HOME=/opt/dagster/home

# A virtual environment keeps the project's packages apart from the base image's Python.
# DAGSTER_HOME belongs to the image's user: a deployment mounts dagster.yaml there and a
# volume on storage/ (which takes the folder's owner when Docker first fills it).
RUN python3 -m venv /opt/itk_infer \
    && useradd --create-home --uid 1000 --user-group --shell /bin/bash itk \
    && mkdir -p /opt/dagster/home/storage \
    && echo "# Default (SQLite) instance; a deployment mounts its dagster.yaml here." \
        >/opt/dagster/home/dagster.yaml \
    && chown -R itk:itk /opt/dagster

# Dependencies first: this layer only changes with pyproject.toml, the wheels or the arguments,
# so editing the source does not reinstall torch.
COPY pyproject.toml /tmp/itk_infer-build/pyproject.toml
COPY ${WHEEL_DIR}/ /tmp/itk_infer-build/wheels/
RUN set -eu; \
    cd /tmp/itk_infer-build; \
    python -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb")); print("\n".join(p["build-system"]["requires"] + p["project"]["dependencies"] + p["project"]["optional-dependencies"]["mmengine"]))' > requirements.txt; \
    if [ -f wheels/constraints.txt ]; then set -- --constraint wheels/constraints.txt; else set --; fi; \
    pip install --find-links wheels "$@" "${TORCH_SPEC}" -r requirements.txt ${EXTRA_REQUIREMENTS}; \
    # mmengine asks for opencv-python, whose cv2 needs libGL; the headless build of the same
    # release provides the same cv2 module without a display stack.
    cv=$(pip list --format=freeze | sed -n 's/^opencv-python==//p'); \
    if [ -n "$cv" ]; then \
        pip uninstall --yes opencv-python; \
        pip install --find-links wheels "$@" "opencv-python-headless==$cv"; \
    fi; \
    python -c 'import cv2, onnxruntime, SimpleITK, torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "| onnxruntime", onnxruntime.__version__, onnxruntime.get_available_providers())'; \
    rm -rf /tmp/itk_infer-build

# The project itself (no dependency resolution: everything it needs is above).
COPY pyproject.toml README.md /tmp/itk_infer-src/
COPY itk_infer /tmp/itk_infer-src/itk_infer
COPY itk_infer_assets /tmp/itk_infer-src/itk_infer_assets
RUN pip install --no-deps --no-build-isolation /tmp/itk_infer-src \
    && rm -rf /tmp/itk_infer-src \
    && itk_infer --version

USER itk
WORKDIR /home/itk
EXPOSE 4000
CMD ["dagster", "code-server", "start", "-m", "itk_infer_assets", "-h", "0.0.0.0", "-p", "4000"]
