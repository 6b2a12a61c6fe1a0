# syntax=docker/dockerfile:1
# The eval image: serves a merged checkpoint to HELM on port 80 (NeurIPS 2023 LLM efficiency challenge).
# Weights are downloaded while the image builds (never copied from the repo):
#   docker build --build-arg MODEL_REPO=<your-hf-user>/<merged-model> --build-arg MODEL_NAME=Mistral-7B-v0.1 \
#                --build-arg ALLOW_UNLISTED=true -t submission .
#   docker run --gpus all -p 8080:80 submission
# MODEL_REPO defaults to an approved base model; MODEL_NAME is its litgpt config (checkpoints_manifest.json).
FROM pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

# Dependencies first (cached layer); torch comes with the base image.
COPY pyproject.toml constraints.txt ./
COPY core/ core/
COPY server/ server/
COPY finetune/ finetune/
COPY bench/ bench/
COPY data/tiny_corpus.txt data/tiny_corpus.txt
COPY checkpoints_manifest.json ./
RUN grep -v '^torch' constraints.txt > /tmp/constraints.txt \
    && pip install -c /tmp/constraints.txt -e .

ARG MODEL_REPO=mistralai/Mistral-7B-v0.1
ARG MODEL_NAME=""
ARG ALLOW_UNLISTED=false
ENV CHECKPOINT_DIR=/models/${MODEL_REPO}
# A gated base needs a token: pass it as a BuildKit secret so it never lands in a layer or the history:
#   docker build --secret id=hf_token,env=HF_TOKEN ...
RUN --mount=type=secret,id=hf_token \
    if [ -s /run/secrets/hf_token ]; then export HF_TOKEN="$(cat /run/secrets/hf_token)"; fi; \
    python -m core.hub download --repo_id "${MODEL_REPO}" --checkpoint_dir /models \
        --allow_unlisted "${ALLOW_UNLISTED}" ${MODEL_NAME:+--model_name "${MODEL_NAME}"}

EXPOSE 80
CMD ["sh", "-c", "exec python -m server --checkpoint_dir \"$CHECKPOINT_DIR\" --host 0.0.0.0 --port 80"]
