#!/usr/bin/env bash
# The GPU checks, as one short script for a lent GPU machine (its Python has torch, timm and
# prometheus-client but not the service's web stack or FAISS: wheels for those go in .whl/).
#
#   bash benchmarks/gpu_check.sh OUT_DIR
#
#  1. the service's HTTP tests with the inference worker on the GPU (ACE_TEST_DEVICE=cuda):
#     /match answers, 32 concurrent clients served in batches > 1, hot swaps of index and encoder
#  2. the CUDA-only test (GPU autocast locations agree with the CPU's)
#  3. benchmarks/serving.py on the GPU (issue 15), with the shipped dense encoder and with ViT-B/16 at
#     448 px: /match images/s at saturation vs the raw batched encoder, batched vs max_batch_size=1,
#     p50/p99 at 64 clients, mean batch, CPU ms per request outside the model
#  4. benchmarks/encoder.py on the GPU: encoder batch scaling and ACE training steps
# Budget: ~8 minutes in all (the lent machine allows 10 per command).
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
ACE_TEST_DEVICE=cuda timeout 150 python3 -m pytest -q -p no:cacheprovider -p no:randomly \
    tests/service/test_match.py tests/service/test_operations.py tests/service/test_generations.py \
    tests/service/test_errors.py 2>&1 | tail -n 25 | tee "$out/service-tests-cuda.txt"

step "serving benchmark on the GPU: the shipped encoder"
timeout 130 python3 benchmarks/serving.py --device cuda --encoder artifacts/ace-dense-phantoms \
    --batch 32 --clients 64 --seconds 5 --rounds 2 --threads 4 --image-side 1024 \
    2>"$out/serving-dense-cuda.log" | tee "$out/serving-dense-cuda.json"; tail -n 20 "$out/serving-dense-cuda.log"

step "serving benchmark on the GPU: ViT-B/16 at 448 px"
timeout 130 python3 benchmarks/serving.py --device cuda --backbone vit_base_patch16_224 --img-size 448 \
    --batch 32 --clients 64 --seconds 5 --rounds 2 --threads 4 --image-side 1024 \
    2>"$out/serving-vitb-cuda.log" | tee "$out/serving-vitb-cuda.json"; tail -n 20 "$out/serving-vitb-cuda.log"

step "encoder benchmark on the GPU"
timeout 90 python3 benchmarks/encoder.py --device cuda --rounds 2 2>&1 | tee "$out/encoder-cuda.md"
step done
