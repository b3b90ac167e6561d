# syntax=docker/dockerfile:1
# imgpipe image for the Ray cluster (KubeRay pods, Ray cluster launcher nodes, the
# nightly CronJob): Ray's image of the pinned Ray version + imgpipe installed as a wheel.
#
#   docker build --build-arg VARIANT=cpu -t $REGISTRY/imgpipe:0.1.0-cpu .   # head, CPU workers, CronJob
#   docker build --build-arg VARIANT=gpu -t $REGISTRY/imgpipe:0.1.0-gpu .   # GPU workers (CUDA torch)
#
# VARIANT picks the base image (rayproject/ray:<RAY_VERSION>-py311-<VARIANT>) and the
# torch wheels: CPU-only wheels from PyTorch's CPU index for cpu (no CUDA libraries in
# the image), PyPI's CUDA wheels for gpu. RAY_VERSION must equal rayVersion in
# cluster/kuberay/raycluster.yaml (tests/test_cluster_configs.py checks it).

ARG RAY_VERSION=2.60.0
ARG VARIANT=cpu

# ---- build: the imgpipe wheel, from the sources only (see .dockerignore) -------------
FROM rayproject/ray:${RAY_VERSION}-py311-${VARIANT} AS build
WORKDIR /home/ray/src
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users pipeline ./pipeline
COPY --chown=ray:users jobs ./jobs
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /home/ray/wheels .

# ---- runtime: Ray's image + the wheel and its dependencies ---------------------------
FROM rayproject/ray:${RAY_VERSION}-py311-${VARIANT} AS runtime
ARG RAY_VERSION
ARG VARIANT
COPY --from=build --chown=ray:users /home/ray/wheels /tmp/wheels
# cpu: torch from PyTorch's CPU-only index; gpu: PyPI's default (CUDA) wheels. ray is
# pinned to the base image's version so that pip never replaces it; s3fs[boto3] brings a
# boto3 that agrees with aiobotocore, for the AWS node provider of the launcher's head.
# The other versions are the wheel's own requirements (pyproject.toml).
# hadolint ignore=DL3013
RUN if [ "$VARIANT" = cpu ]; then export PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu; fi \
 && pip install --no-cache-dir /tmp/wheels/*.whl "ray[data,train,default]==${RAY_VERSION}" "s3fs[boto3]" \
 && rm -rf /tmp/wheels \
 && imgpipe --help > /dev/null
# Ray's image runs as the unprivileged user ray (uid 1000, gid 100 "users"); say so.
USER 1000:100
WORKDIR /home/ray
