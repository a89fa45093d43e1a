#!/usr/bin/env bash
# The checks that need a CUDA device, in one run (about 8 minutes on one H200 with 16 CPU cores):
#   1. tests/test_cuda.py: every shipped model trains and draws on the device, a CUDA checkpoint
#      gives the same densities on the CPU and resumes there (and back), the verdict, the PSIS
#      correction and the subsampled source run on the device;
#   2. real_designs.py --device cuda: one NPE training step by phase at issue #19's real design
#      sizes, and the 10-10^4 groups sweep;
#   3. large.py --device cuda: 10^6 groups, subsampled training, every group's posterior;
#   4. real_designs.py --device cpu on the same machine's CPU cores: the baseline of the same run.
# Runs with the machine's python3 and torch; pyro-ppl, pyro-api and omegaconf are installed from
# wheels in .whl when present (a machine without a package index). Writes log.txt and the
# benchmarks' results under $OUT (default checkpoints/gpu-check). The benchmarks run only when the
# tests pass (BENCH_ANYWAY=1: in any case); CPU_BASELINE=0 leaves out step 4, LARGE=0 step 3;
# RD_BATCHES sets step 2's batch sizes (default "128 1024").
#
#     bash experiments/bench/gpu_check.sh
set -u
OUT=${OUT:-checkpoints/gpu-check}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
LOG=$OUT/log.txt
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, pyro; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available(), 'pyro', pyro.__version__)"
    echo "== 1. tests/test_cuda.py"
    timeout 150 python3 -m pytest tests/test_cuda.py -q -p no:cacheprovider --tb=short 2>&1 | tail -60
    if [ "${PIPESTATUS[0]}" != 0 ]; then
        echo "the CUDA tests fail"
        [ "${BENCH_ANYWAY:-0}" = 1 ] || { echo "benchmarks not run (BENCH_ANYWAY=1 runs them)"; exit 1; }
    fi
    echo "== 2. real_designs.py on cuda"
    timeout 170 python3 experiments/bench/real_designs.py --device cuda --threads 4 --batch-sizes ${RD_BATCHES:-128 1024} \
        --sweep-batch 128 --budget 4 --usable 200 --out "$OUT/rd-cuda" 2>&1 | grep -v "^written"
    echo "== 3. large.py on cuda"
    [ "${LARGE:-1}" = 1 ] && timeout 120 python3 experiments/bench/large.py --device cuda --threads 4 --out "$OUT/large-cuda" 2>&1 | tail -25
    [ "${CPU_BASELINE:-1}" = 1 ] || exit 0
    echo "== 4. real_designs.py on the CPU (16 threads): the baseline"
    timeout 150 python3 experiments/bench/real_designs.py --device cpu --threads 16 --batch-sizes 128 \
        --sweep-batch 128 --budget 6 --usable 200 --out "$OUT/rd-cpu" 2>&1 | grep -v "^written"
    date -u
} 2>&1 | tee "$LOG"
