# The tla image: tla_jobs (the `tla` CLI and the TL-Align trainer) on top of an official PyTorch image,
# for GPU clusters (Pyxis/enroot, Apptainer, podman). docker/README.md has the whole story.
#
#   tla image build [--base IMAGE] [--tag TAG]        (or docker/build.sh; both pass the build args below)
#
# BASE_IMAGE: an official CUDA PyTorch image, which already holds torch and torchvision (CUDA, cuDNN,
# NCCL) in /opt/conda. They are kept as they are: the build pins torch, torchvision, triton and the
# nvidia-* libraries to the versions the base image has, so pip can neither replace nor upgrade them.
# The default is the release constraints.txt pins for this project's machines (see docker/README.md).
ARG BASE_IMAGE=pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime
FROM ${BASE_IMAGE}

ARG BASE_IMAGE
# Extras of the package to add (comma-separated, e.g. "tb,plot"): tb (TensorBoard event files) by default.
ARG TLA_EXTRAS="tb"
# The non-root user's id (numeric, so that hosts and runtimes need not resolve a name).
ARG TLA_UID=1000

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The official images build as root already; said explicitly for other bases.
USER 0
WORKDIR /opt/tla/src

# 1. The base image's own torch stack, as pip constraints: a file kept in the image, so that anyone
#    adding packages on top can pin against it too. docker/deps.py refuses a base without torch.
COPY docker/deps.py /opt/tla/deps.py
RUN python /opt/tla/deps.py constraints > /opt/tla/base-constraints.txt \
 && cat /opt/tla/base-constraints.txt

# 2. The other dependencies, read from pyproject.toml alone (a layer that survives code changes).
#    pip reaches its index through the build's network. Where that needs a private CA, the builder
#    passes it as the build secret `pip_cert` (`tla image build --ca-bundle FILE`): it is mounted for
#    the RUN steps only and never stored in a layer.
COPY pyproject.toml ./
RUN --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
 && python /opt/tla/deps.py requirements pyproject.toml > /opt/tla/requirements.txt \
 && python -m pip install --no-cache-dir --disable-pip-version-check --progress-bar off \
        -c /opt/tla/base-constraints.txt -r /opt/tla/requirements.txt

# Set by `tla image build` / docker/build.sh from the source tree; a plain `docker build .` gets "unknown".
# Declared here, after the dependency layers: a build argument changes the cache key of every RUN
# below it, so a new version or commit re-runs only the package's own steps.
ARG TLA_VERSION=unknown
# 3. The package itself (nothing left to resolve), then a check that the version label tells the truth.
COPY README.md ./
COPY tla_jobs ./tla_jobs
COPY docker/entrypoint.sh /usr/local/bin/tla-entrypoint
RUN --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
 && python -m pip install --no-cache-dir --disable-pip-version-check --progress-bar off \
        -c /opt/tla/base-constraints.txt --no-deps . \
 && chmod 0755 /usr/local/bin/tla-entrypoint \
 && installed="$(tla --version)" \
 && if [ "${TLA_VERSION}" != unknown ] && [ "${installed}" != "tla ${TLA_VERSION}" ]; then \
        echo "the version label says ${TLA_VERSION}, the image has '${installed}'" >&2; exit 1; fi \
 && python -c "import torch, torchvision, timm, tla_jobs; print('torch', torch.__version__, 'timm', timm.__version__)"

# 4. A non-root user. Pyxis and Apptainer run the step as the submitting user anyway; this is the
#    default for `docker run` / `podman run`. The sources are not kept (the package is installed).
WORKDIR /workspace
RUN rm -rf /opt/tla/src \
 && useradd --no-log-init --create-home --shell /bin/bash --uid "${TLA_UID}" --user-group tla \
 && chown tla:tla /workspace

ARG GIT_COMMIT=unknown
LABEL org.opencontainers.image.title="tla" \
      org.opencontainers.image.description="DeiT training with Token-Label Alignment, and its SLURM orchestration" \
      org.opencontainers.image.version="${TLA_VERSION}" \
      org.opencontainers.image.revision="${GIT_COMMIT}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"

# The same facts as the labels, for programs inside (`tla --version` prints both).
ENV TLA_IMAGE_VERSION=${TLA_VERSION} \
    TLA_IMAGE_REVISION=${GIT_COMMIT} \
    PYTHONUNBUFFERED=1
USER ${TLA_UID}

# `tla ARGS...`; a first argument that is a program on PATH (python, bash) runs that program instead,
# which is how the podman runtime starts submitit's `python -u -m submitit.core._submit`.
ENTRYPOINT ["/usr/local/bin/tla-entrypoint"]
CMD ["--help"]
