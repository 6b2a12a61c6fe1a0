#!/usr/bin/env bash
# Issue 13's GPU measurements, one mode per call, each under 10 minutes on an H200; JSON under $OUT/<mode>/.
# Random weights of the real architectures (bench.random_checkpoint); the work directory is deleted at the end.
#
#   bash bench/fetch_wheels.sh            # here, once: .whl/ (litgpt, jsonargparse, bitsandbytes, pytest, ...)
#   bash bench/gpu_issue13.sh MODE        # on the GPU machine (device tool: carry [.whl])
#
# Modes:
#   qlora-2048    Mistral-7B r16 all linear + head, 2048-token rows: QLoRA with ours (defaults), ours-in-block,
#                 ours-auto, hf-peft, then our bf16 LoRA (for the 70% ratio)
#   qlora-mixed   the same on Alpaca/LIMA-length rows (ours packs), QLoRA only
#   recipe4090    README's 4090 recipe (QLoRA r64 a128, all linear) under a true 24 GiB cap: plan, peak, tokens/s
#   qwen14b-40    Qwen2.5-14B LoRA r8 under a true 40 GiB cap: plan, estimate vs measured peak, headroom
#   test-gpu      make test-gpu's tests (pytest -m gpu), output in $OUT/test-gpu/pytest.txt
# Extra arguments go to the mode's command (e.g. for qlora-2048: --steps 8).
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:?usage: bash bench/gpu_issue13.sh qlora-2048|qlora-mixed|recipe4090|qwen14b-40|test-gpu}
shift
OUT=${OUT:-out/bench}
DEST="$OUT/$MODE"
mkdir -p "$DEST"
if [ -d .whl ] && [ ! -f /tmp/site/.issue13 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  touch /tmp/site/.issue13
fi
export PYTHONPATH=/tmp/site:$PWD
WORK=$(mktemp -d /tmp/issue13-"$MODE".XXXX)
trap 'rm -rf "$WORK"' EXIT
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$DEST/gpu.txt" 2>&1 || true

case "$MODE" in
  qlora-2048)
    python3 -m bench.finetune --out_dir "$DEST/qlora" --work_dir "$WORK" --cases '[mistral-2048-r16]' --quantize '[bnb.nf4]' \
      --trainers '[ours, ours-in-block, ours-auto, hf-peft]' --steps 6 "$@"
    rm -rf "$WORK/runs"
    python3 -m bench.finetune --out_dir "$DEST/bf16" --work_dir "$WORK" --cases '[mistral-2048-r16]' --quantize '[null]' \
      --trainers '[ours]' --steps 6 "$@"
    ;;
  qlora-mixed)
    python3 -m bench.finetune --out_dir "$DEST" --work_dir "$WORK" --cases '[mistral-mixed-r16]' --quantize '[bnb.nf4]' \
      --trainers '[ours, ours-in-block, ours-auto, hf-peft]' --steps 6 "$@"
    ;;
  recipe4090)
    python3 -m bench.plan_check --out_dir "$DEST" --work_dir "$WORK" --case recipe4090 "$@"
    ;;
  qwen14b-40)
    python3 -m bench.plan_check --out_dir "$DEST" --work_dir "$WORK" --case qwen14b-40 "$@"
    ;;
  test-gpu)
    python3 -m pytest -q -m gpu -p no:cacheprovider --basetemp "$WORK/pytest" tests/test_gpu.py "$@" 2>&1 | tee "$DEST/pytest.txt"
    exit "${PIPESTATUS[0]}"
    ;;
  *)
    echo "unknown mode $MODE" >&2; exit 2 ;;
esac
