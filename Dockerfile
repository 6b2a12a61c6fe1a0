# syntax=docker/dockerfile:1
# The eval image: serves a merged checkpoint to HELM on port 80 (NeurIPS 2023 LLM efficiency challenge).
# Weights are downloaded while the image builds (never copied from the repo), from a public repo, with no secret:
#   docker build --build-arg MODEL_REPO=<your-hf-user>/<merged-model> --build-arg MODEL_NAME=Mistral-7B-v0.1 \
#                --build-arg ALLOW_UNLISTED=true -t submission .
#   docker run --gpus all -p 8080:80 submission
# MODEL_REPO defaults to an approved, ungated base model (checkpoints_manifest.json); `make submission` points it
# at your uploaded merge. The image runs the torch the tests run (the Makefile's TORCH), as its CUDA build.
FROM nvidia/cuda:13.0.0-runtime-ubuntu24.04

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* && python3 -m venv /opt/venv
WORKDIR /app

# Dependencies first (cached layer): the tested torch from PyTorch's CUDA 13.0 wheel index, then the pins.
RUN pip install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cu130
COPY pyproject.toml constraints.txt ./
COPY core/ core/
COPY server/ server/
COPY finetune/ finetune/
COPY bench/ bench/
COPY data/tiny_corpus.txt data/tiny_corpus.txt
COPY checkpoints_manifest.json ./
RUN grep -v '^torch==' constraints.txt > /tmp/constraints.txt \
    && pip install -c /tmp/constraints.txt -e .

ARG MODEL_REPO=Qwen/Qwen2.5-7B
ARG MODEL_NAME=""
ARG ALLOW_UNLISTED=false
ENV CHECKPOINT_DIR=/models/${MODEL_REPO}
# One copy of the weights: the HF files are deleted once lit_model.pth verifies. A private repo can still be
# read with a BuildKit secret, which never lands in a layer or the history (the organizers build with none):
#   docker build --secret id=hf_token,env=HF_TOKEN ...
RUN --mount=type=secret,id=hf_token \
    if [ -s /run/secrets/hf_token ]; then export HF_TOKEN="$(cat /run/secrets/hf_token)"; fi; \
    python -m core.hub download --repo_id "${MODEL_REPO}" --checkpoint_dir /models --delete_hf_weights true \
        --allow_unlisted "${ALLOW_UNLISTED}" ${MODEL_NAME:+--model_name "${MODEL_NAME}"}

EXPOSE 80
CMD ["sh", "-c", "exec python -m server --checkpoint_dir \"$CHECKPOINT_DIR\" --host 0.0.0.0 --port 80"]
