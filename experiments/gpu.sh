#!/usr/bin/env bash
# The GPU check in one command: tests/gpu, then the GPU benchmark suite (configs/bench_gpu.py). Everything it
# prints and writes lands in one folder: environment.txt (nvidia-smi, jax's environment), tests.txt (and
# tests_no_triton.txt: the exactness tests with XLA's Triton GEMMs off), hlo*/ (the tested programs' optimised
# HLO), bench.log, bench/bench.json, bench/bench.md and bench/ TensorBoard events.
#
#   bash experiments/gpu.sh [OUTDIR] [--config.key=value ...]     (default OUTDIR: runs/gpu)
#
# Needs an NVIDIA GPU and jax with CUDA (PYTHON picks the interpreter, default python3). On an H200 it runs in
# under 10 minutes: the tests take about a minute, the suite stops starting groups after
# config.time_budget_s (420 s).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/gpu}"
shift || true
mkdir -p "$out"
py="${PYTHON:-python3}"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cuda}" PYTHONUNBUFFERED=1
# The suite compiles each program twice (once to inspect its HLO, once to run it): a compilation cache makes the
# second a lookup.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/qjax-jax-cache}"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
start=$(date +%s)
{ nvidia-smi; "$py" -c 'import jax; jax.print_environment_info()'; } > "$out/environment.txt" 2>&1
echo "gpu.sh: tests/gpu"
# -rA prints the measured errors of the passing tests too; QJAX_GPU_OUT receives the optimised HLO of the
# exactness tests' programs, so a failure can be read after the machine is gone.
QJAX_GPU_OUT="$out/hlo" "$py" -m pytest -q -rA -p no:cacheprovider tests/gpu 2>&1 | tee "$out/tests.txt"
tests_rc=${PIPESTATUS[0]}
echo "gpu.sh: the exactness tests again with XLA's Triton GEMMs off (cuBLAS(Lt) kernels only)"
XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_triton_gemm=false" QJAX_GPU_OUT="$out/hlo_no_triton" \
  "$py" -m pytest -q -rA -p no:cacheprovider tests/gpu -k "exact or equals or matches" 2>&1 \
  | tee "$out/tests_no_triton.txt"
echo "gpu.sh: benchmark ($(( $(date +%s) - start )) s so far)"
"$py" -m experiments.bench --config=configs/bench_gpu.py --workdir="$out/bench" "$@" 2>&1 | tee "$out/bench.log"
bench_rc=${PIPESTATUS[0]}
echo "gpu.sh: tests exit $tests_rc, benchmark exit $bench_rc, $(( $(date +%s) - start )) s; results in $out" \
  | tee -a "$out/bench.log"
exit $(( tests_rc != 0 || bench_rc != 0 ))
