#!/usr/bin/env bash
# Every GPU test and benchmark in one go (at most ~9.5 minutes on one H100 / H200), on SmolLM2-135M's
# exact architecture with random weights (--config-only): the 98 MB GGUF does not travel to a GPU box.
#
#   1. tests/test_lm_static.py on CUDA: the static and compiled (CUDA-graph) decode paths
#      against the dynamic cache (float32 to 1e-4, bf16 sampling and SMC);
#   2. decode_step.py: one decode step with kv_cache = dynamic / static / compiled at
#      B = 64, 256, 1024, bf16, as a ratio to the compute bound 2*params*B / 790 TFLOP/s, plus a
#      whole lm.sample(B, T=24) per setting (target: compiled step within 3x of the bound);
#   3. sampling.py: lm.sample vs model.generate at B = 64, 256, 1024 (T = 24);
#   4. SMC vs LLaMPPL ("avoid the letter e", N = 64, 256), if llamppl is importable; else ours only.
# Each step has its own time limit (120 + 240 + 90 + 90 s, so the whole fits the device tool's
# 10-minute command limit) and a failure does not stop the next one.
#
# Prepare, on a machine with the package index (repo root):
#   python -c "import ppl_lm; ppl_lm.load_lm().tokenizer.save_pretrained('.gpu/tokenizer')"
#   echo /.gpu/ >> .git/info/exclude
#   # wheels missing from the GPU image (Python 3.12): pyro and, for the LLaMPPL comparison, llamppl
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl \
#       pyro-ppl pyro-api llamppl genlm-backend
# then run it there with `.gpu` carried (device tool: carry [".gpu"], timeout_s 600):
#   bash benchmarks/gpu.sh 2>&1 | tee $OUT/gpu.log
# The image's transformers (5.17 when last read) has the same StaticCache API as 5.24 here.
# Results: the printed ratios and benchmarks/out/*.jsonl (copy them to $OUT when there is one).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}

if [ -d .gpu/whl ] && ls .gpu/whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! $PY -c "import ppl_lm.inference" 2>/dev/null; then
    # the package maps ppl_lm.inference to inference/: install it (no dependencies fetched)
    $PY -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/site .
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
GPU=$($PY -c "import torch; print(torch.cuda.get_device_name())")
# assumed, not measured here (no GPU yet): achievable bf16 matmul ~790 TFLOP/s (dense peak 989), device
# copy ~3.0 TB/s (H100, spec 3.35) and ~4.3 TB/s (H200, spec 4.8); replace with measured values when known
case "$GPU" in
    *H200*) TBPS=4.3 ;;
    *H100*) TBPS=3.0 ;;
    *) TBPS=2.0 ;;
esac
TOK=()
[ -d .gpu/tokenizer ] && TOK=(--tokenizer .gpu/tokenizer)

# -P: import ppl_lm from /tmp/site (where ppl_lm.inference is mapped), not from the checkout
step() {  # step NAME SECONDS CMD...: run with a time limit; report a failure, carry on
    local name=$1 limit=$2; shift 2
    echo "== $name =="
    local t0=$SECONDS
    timeout "$limit" "$@" || echo "!! $name failed or timed out (exit $?)"
    echo "-- $name: $((SECONDS - t0)) s"
}

step "tests: static / compiled KV cache on CUDA" 120 \
    $PY -P -m pytest -q -p no:cacheprovider tests/test_lm_static.py

step "decode step: dynamic vs static vs compiled, SmolLM2 config, bf16" 240 \
    $PY benchmarks/decode_step.py --device cuda --config-only --batch 64 256 1024 \
    --peak-tflops 790 --peak-tbps "$TBPS"

step "sampling: ours vs generate, SmolLM2 config, bf16" 90 \
    $PY benchmarks/sampling.py --device cuda --config-only --models smollm2 --batch 64 256 1024 \
    --tokens 24 --repeats 5

if [ ${#TOK[@]} -eq 0 ]; then
    echo "== SMC: no .gpu/tokenizer: the letter-e mask needs SmolLM2's tokenizer; skipped (see the header)"
else
    EXTRA=()
    $PY -c "import llamppl" 2>/dev/null || { echo "llamppl not importable: ours only"; EXTRA=(--no-llamppl); }
    step "SMC: ours vs LLaMPPL (avoid the letter e)" 90 \
        $PY benchmarks/smc_vs_llamppl.py --device cuda --config-only "${TOK[@]}" --particles 64 256 \
        --tokens 24 --seeds 2 "${EXTRA[@]}"
fi

if [ -n "${OUT:-}" ]; then cp benchmarks/out/*.jsonl "$OUT"/ 2>/dev/null || true; fi
