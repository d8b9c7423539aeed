# syntax=docker/dockerfile:1
# One image for the API and the workers; the command decides (see docker-compose.yml and docs/DEPLOYMENT.md):
#   docker build -t tdserve .
#   docker run -p 8000:8000 tdserve api
#   docker run --gpus all -v /srv/checkpoints:/checkpoints:ro tdserve worker --model wan2.1-t2v-1.3b
#
# torch 2.13.0 from PyPI is the CUDA 13.0 build: it pins the CUDA 13.0.3 libraries, cuDNN 9.20 and NCCL as pip
# wheels, so the base image only has to match the CUDA major version (the host driver must support CUDA 13,
# i.e. R580 or newer). The cudnn flavour of the base image would ship a second cuDNN that torch never loads.
# Ubuntu 24.04 because the project needs Python >= 3.11 (24.04's python3 is 3.12).

FROM nvidia/cuda:13.0.1-runtime-ubuntu24.04 AS base
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# gcc, libc6-dev and python3-dev are runtime needs: Triton compiles its small C launcher against Python.h the
# first time a kernel runs, inside the worker. Versions come from the pinned base image's Ubuntu release; exact
# apt pins would break rebuilds as soon as the archive moves on.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# --- builder: a virtual environment with the pinned CUDA torch and the app installed as a package -------------
FROM base AS builder
ARG TORCH_VERSION=2.13.0
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch gets its own layer: ~3 GB of wheels that change far less often than the app.
RUN pip install "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY engine/ engine/
COPY service/ service/
# ffmpeg comes from the imageio-ffmpeg wheel (a static binary), not from apt; resolving it here fails the build
# if the wheel lacks one for this platform.
RUN pip install . \
    && python -c "import imageio_ffmpeg; print(imageio_ffmpeg.get_ffmpeg_exe())"

# --- kernels: the CUDA C++ kernels of csrc/ built ahead of time for sm_90a (H100) --------------------------
# The engine builds them with nvcc on first use and keeps Triton as the fallback; the runtime image has no nvcc,
# so they are built here into the cache directory the runtime points TDSERVE_KERNEL_CACHE at (file names carry the
# hash of the sources, which the runtime reads from TDSERVE_CSRC to find them). nvcc's static cudart: the libraries
# need only the driver. cuda-minimal-build is NVIDIA's nvcc + cudart/driver headers meta-package for this release;
# nvcc compiles the host side with g++.
FROM base AS kernels
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends cuda-minimal-build-13-0 g++ \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/tdserve
COPY csrc/ csrc/
COPY engine/__init__.py engine/__init__.py
COPY engine/ops/__init__.py engine/ops/cuda_build.py engine/ops/
ENV PATH=/usr/local/cuda/bin:$PATH \
    TDSERVE_CSRC=/opt/tdserve/csrc
RUN python3 -m engine.ops.cuda_build /opt/tdserve/kernels

# --- runtime: the venv, two small scripts, the prebuilt kernels, a non-root user --------------------------
FROM base AS runtime
# /data/results and the GPU lock folder are created here, owned by the app user, so that the named volumes
# mounted over them start with that ownership.
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin tdserve \
    && mkdir -p /data/results /checkpoints /run/tdserve/gpu-locks \
    && chown -R tdserve:tdserve /data /run/tdserve
COPY --from=builder /opt/venv /opt/venv
COPY --from=kernels /opt/tdserve/csrc /opt/tdserve/csrc
COPY --from=kernels /opt/tdserve/kernels /opt/tdserve/kernels
COPY docker/entrypoint.py docker/healthcheck.py /opt/tdserve/
# CUDA_DEVICE_ORDER: CUDA's device indices follow the PCI bus order that nvidia-smi shows, so the GPU index that
# entrypoint.py logs for a worker is the one an operator sees in nvidia-smi.
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/tdserve \
    CUDA_DEVICE_ORDER=PCI_BUS_ID \
    TD_API_HOST=0.0.0.0 \
    TD_STORAGE_DIR=/data/results \
    TD_CHECKPOINT_ROOT=/checkpoints \
    TDSERVE_CSRC=/opt/tdserve/csrc \
    TDSERVE_KERNEL_CACHE=/opt/tdserve/kernels
# Numeric, so that runtimes checking runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
WORKDIR /home/tdserve
EXPOSE 8000 9100
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "/opt/tdserve/healthcheck.py"]
ENTRYPOINT ["python", "/opt/tdserve/entrypoint.py"]
CMD ["api"]
