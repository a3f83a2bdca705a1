#!/usr/bin/env bash
# The GPU checks in one command, for a lent GPU machine (Python 3.12 with its own CUDA torch, no network):
#
#   bash scripts/gpu_check.sh        # here first: bash scripts/gpu_wheels.sh (fills .whl/, which must travel along)
#
# 1. installs the wheels in .whl/ (unless deepspeed, webdataset, rasterio and zarr already import);
# 2. nvidia-smi and torch's view of the GPU;
# 3. the GPU tests, tests/test_gpu.py: the CLI chain at ZeRO-1 and ZeRO-3 (bf16, compile) and a kill -9 + resume;
# 4. throughput through the product, benchmarks/bench_product_gpu.py: `train finetune` / `pretrain` of `large`
#    (eager; --compile would spend the budget compiling), then `infer run` over an 8192 x 8192 BW-sized scene.
# Logs and JSON go to $OUT (set by the device tool; default gpu_out/): summary.txt (each step's exit status,
# time and last lines; the install and nvidia-smi output), tests.log, tests.xml (junit, with the resume gap),
# bench_train.log/.json, bench_infer.log/.json: 7 files (the tool brings back at most 8).
#
# Device-time budget, about 8 minutes in all. Every step is cut off at its limit (timeout, then SIGKILL 15 s
# later), so the later steps still run and report; the exit status is that of the first failed step.
#   install 45 s | nvidia-smi 15 s
#   tests 170 s: 3 in parallel; alone each takes about 1.5 min, mostly process start and compilation
#   train throughput 135 s: city generation + prep ~20 s, FLOP counts ~10 s, two runs of ~40 s, baseline ~20 s
#   infer throughput 125 s: scene generation ~30 s, export ~10 s, the run (cut at 80 s), forward baseline ~5 s
#   = 490 s. Run it with the device tool's timeout_s at 600.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
summary=$OUT/summary.txt
status=0
py=python3
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 MLFLOW_ALLOW_FILE_STORE=true

step() {  # step NAME SECONDS LOG COMMAND...: run COMMAND under a time limit, output to LOG and the summary
  local name=$1 limit=$2 log=$3 t0 rc
  shift 3
  t0=$(date +%s)
  timeout -k 15 "$limit" "$@" >"$log" 2>&1
  rc=$?
  echo "== $name: exit $rc in $(( $(date +%s) - t0 )) s (limit $limit s)" | tee -a "$summary"
  tail -n 40 "$log" >>"$summary"
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
}

install_wheels() {
  if ! $py -c 'import deepspeed, webdataset, rasterio, zarr' 2>/dev/null; then
    $py -m pip install -q --no-index --find-links .whl --no-cache-dir deepspeed webdataset rasterio zarr numcodecs
  fi
  $py -c 'import deepspeed, rasterio, zarr; print("deepspeed", deepspeed.__version__, "rasterio", rasterio.__version__)'
}

gpu_info() {
  nvidia-smi
  $py -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name(0))'
}
export -f install_wheels gpu_info
export py

parallel=()
if $py -c 'import xdist' 2>/dev/null; then parallel=(-n 3); fi

: >"$summary"
step install 45 "$OUT/install.log" bash -c install_wheels
step nvidia-smi 15 "$OUT/gpu.log" bash -c gpu_info
rm -f "$OUT/install.log" "$OUT/gpu.log"
step tests 170 "$OUT/tests.log" $py -m pytest -m gpu tests/test_gpu.py -q -rA -p no:cacheprovider \
  --junitxml="$OUT/tests.xml" "${parallel[@]}"
step "train throughput" 135 "$OUT/bench_train.log" $py benchmarks/bench_product_gpu.py train \
  --city-size 384 --warmup 3 --steps 6 --run-timeout 50 --json "$OUT/bench_train.json"
step "infer throughput" 125 "$OUT/bench_infer.log" $py benchmarks/bench_product_gpu.py infer \
  --size 8192 --run-timeout 80 --json "$OUT/bench_infer.json"
echo "== gpu_check: exit $status" | tee -a "$summary"
exit "$status"
