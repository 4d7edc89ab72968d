#!/usr/bin/env bash
# Every GPU benchmark in one go (a few minutes on one H100 / H200), on SmolLM2-135M's exact
# architecture with random weights (--config-only): the 98 MB GGUF does not travel to a GPU box.
#
#   1. sampling: lm.sample vs model.generate at B = 64, 256, 1024 (T = 24), plus single decode
#      steps timed against the compute and memory bounds of the card;
#   2. SMC vs LLaMPPL ("avoid the letter e", N = 64, 256), if llamppl is importable; else ours only.
#
# Prepare, on a machine with the package index (repo root):
#   python -c "import ppl_lm; ppl_lm.load_lm().tokenizer.save_pretrained('.gpu/tokenizer')"
#   echo /.gpu/ >> .git/info/exclude
#   # wheels missing from the GPU image (Python 3.12): pyro and, for the LLaMPPL comparison, llamppl
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl \
#       pyro-ppl pyro-api llamppl genlm-backend
# then run it there with `.gpu` carried:  bash benchmarks/gpu.sh
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
# measured here on these cards: bf16 matmul ~790 TFLOP/s; device copy ~3.0 TB/s (H100), ~4.3 TB/s (H200)
case "$GPU" in
    *H200*) TBPS=4.3 ;;
    *H100*) TBPS=3.0 ;;
    *) TBPS=2.0 ;;
esac
TOK=()
[ -d .gpu/tokenizer ] && TOK=(--tokenizer .gpu/tokenizer)

echo "== sampling: ours vs generate, SmolLM2 config, random weights, bf16 =="
$PY benchmarks/sampling.py --device cuda --config-only --models smollm2 --batch 64 256 1024 \
    --tokens 24 --repeats 5 --decode-steps --context 128 --step-repeats 30 \
    --peak-tflops 790 --peak-tbps "$TBPS"

echo "== SMC: ours vs LLaMPPL (avoid the letter e) =="
if [ ${#TOK[@]} -eq 0 ]; then
    echo "no .gpu/tokenizer: the letter-e mask needs SmolLM2's tokenizer; skipped (see the header)"
else
    EXTRA=()
    $PY -c "import llamppl" 2>/dev/null || { echo "llamppl not importable: ours only"; EXTRA=(--no-llamppl); }
    $PY benchmarks/smc_vs_llamppl.py --device cuda --config-only "${TOK[@]}" --particles 64 256 \
        --tokens 24 --seeds 2 "${EXTRA[@]}"
fi

if [ -n "${OUT:-}" ]; then cp benchmarks/out/*.jsonl "$OUT"/ 2>/dev/null || true; fi
