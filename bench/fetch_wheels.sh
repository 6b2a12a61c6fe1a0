#!/usr/bin/env bash
# Fetch the cp312 wheels the lent GPU machine lacks (it has torch, lightning, transformers, peft,
# tokenizers, sentencepiece, httpx, pyyaml...) into .whl/, at the versions pinned in constraints.txt.
# Then, in the device command:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD
# bitsandbytes' wheel holds one library per CUDA/ROCm version (~58 MB); it is slimmed here to the CPU and
# CUDA 13.0 libraries (the GPU machine's torch is cu130), ~4 MB. Pass --no-bnb to leave it out.
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
[ "${1:-}" = "--no-bnb" ] || specs+=("bitsandbytes==0.49.2")
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
du -sh .whl
