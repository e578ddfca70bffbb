#!/usr/bin/env bash
# The GPU checks, as one short script for a lent GPU machine (its Python has torch, timm and
# prometheus-client but not the service's web stack or FAISS: wheels for those go in .whl/).
#
#   bash benchmarks/gpu_check.sh OUT_DIR
#
#  1. the service's HTTP tests with the inference worker on the GPU (ACE_TEST_DEVICE=cuda):
#     /match answers, 32 concurrent clients served in batches > 1, hot swaps of index and encoder
#  2. the CUDA-only test (GPU autocast locations agree with the CPU's)
#  3. benchmarks/serving.py on the GPU: batched vs batch-1 /match throughput and service vs raw
#     encoder, ViT-B/16 at 448 px (a GPU-sized encoder)
#  4. benchmarks/encoder.py on the GPU: encoder batch scaling and ACE training steps
set -uo pipefail
out="${1:?usage: gpu_check.sh OUT_DIR}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

step() { echo "== $1 ($(date +%T))"; }

step environment
{ nvidia-smi -L
  python3 -c 'import torch, timm, faiss, fastapi
print("torch", torch.__version__, "timm", timm.__version__, "faiss", faiss.__version__,
      "fastapi", fastapi.__version__, "cuda", torch.cuda.is_available())'
} 2>&1 | tee "$out/environment.txt"

step "service tests on the GPU"
ACE_TEST_DEVICE=cuda timeout 200 python3 -m pytest -q -p no:cacheprovider -p no:randomly \
    tests/service/test_match.py tests/service/test_operations.py tests/service/test_generations.py \
    tests/service/test_errors.py 2>&1 | tail -n 25 | tee "$out/service-tests-cuda.txt"

step "serving benchmark on the GPU"
timeout 200 python3 benchmarks/serving.py --device cuda --backbone vit_base_patch16_224 --img-size 448 \
    --batch 32 --clients 32 --seconds 5 --rounds 2 --threads 4 2>"$out/serving-cuda.log" | tee "$out/serving-cuda.json"; tail -n 20 "$out/serving-cuda.log"

step "encoder benchmark on the GPU"
timeout 120 python3 benchmarks/encoder.py --device cuda --rounds 3 2>&1 | tee "$out/encoder-cuda.md"
step done
