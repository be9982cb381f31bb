#!/usr/bin/env bash
# One device-machine call: the GPU benchmarks in BENCHMARKS.md, logs under $OUT.
# Wheels for what the GPU image lacks travel in .whl/ (git-ignored; carry it with the call). Make it with:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 -d .whl fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 \
#     pydantic pydantic-core annotated-types typing-inspection annotated-doc opentelemetry-api==1.45.2 \
#     typing-extensions==4.16.0 transformers==5.24.0 uvloop httptools
set -u
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
for part in "$@"; do
  case $part in
    kernels) timeout 150 python3 bench/bench_kernels.py > $OUT/kernels.log 2>&1; tail -22 $OUT/kernels.log ;;
    eplb)    timeout 120 python3 bench/bench_eplb.py > $OUT/eplb.log 2>&1; tail -30 $OUT/eplb.log ;;
    serve)   timeout 300 python3 bench/bench_serve.py --device cuda --preset mini --concurrency 1 16 64 \
               --output-len 256 --eplb-modes off on --hf-baseline > $OUT/serve.log 2>&1; tail -8 $OUT/serve.log
             timeout 100 python3 bench/bench_serve.py --device cuda --preset mini --concurrency 64 \
               --output-len 64 --eplb-modes off > $OUT/serve64.log 2>&1; tail -3 $OUT/serve64.log ;;
    flash)   timeout 540 python3 bench/bench_serve.py --device cuda --preset flash --num-layers 2 --concurrency 1 16 64 \
               --output-len 64 --eplb-modes off on --hf-baseline > $OUT/flash.log 2>&1; tail -8 $OUT/flash.log ;;
    decode)  timeout 200 python3 bench/bench_decode_gpu.py --batch 1 8 64 --steps 50 > $OUT/decode.log 2>&1; tail -15 $OUT/decode.log ;;
    engine)  timeout 100 python3 bench/bench_engine_gpu.py --parts check engine --new 256 > $OUT/engine.log 2>&1; tail -10 $OUT/engine.log ;;
    sampler) # #12: sampled vs greedy and EPLB off / record / on (serve.py's default period), one run
             timeout 280 python3 bench/bench_serve.py --device cuda --preset mini --concurrency 64 --output-len 256 \
               --requests-per-client 3 --eplb-modes off on off on --sampling greedy sampled > $OUT/sampler.log 2>&1
             grep -A 20 "^experts" $OUT/sampler.log ;;
    eplbcost) # #12: EPLB on vs off and vs off with on's redundant slots ("slots"); eplbcost0: no redundant slots
             timeout 380 python3 bench/bench_serve.py --device cuda --preset mini --concurrency 64 --output-len 256 \
               --requests-per-client 3 --eplb-modes off slots on off slots on --sampling greedy sampled \
               > $OUT/eplbcost.log 2>&1; grep -A 30 "^experts" $OUT/eplbcost.log ;;
    eplbcost0) timeout 160 python3 bench/bench_serve.py --device cuda --preset mini --concurrency 64 --output-len 256 \
               --requests-per-client 3 --redundant 0 --eplb-modes off on off on --sampling greedy sampled \
               > $OUT/eplbcost0.log 2>&1; grep -A 30 "^experts" $OUT/eplbcost0.log ;;
    flashsampled) # #12 at released width: sampled vs greedy, flash truncated to 2 layers
             timeout 200 python3 bench/bench_serve.py --device cuda --preset flash --num-layers 2 --concurrency 64 \
               --output-len 128 --requests-per-client 2 --eplb-modes off --sampling greedy sampled greedy sampled \
               > $OUT/flashsampled.log 2>&1; grep -A 12 "^experts" $OUT/flashsampled.log ;;
    eplbstep) timeout 45 python3 bench/bench_eplb_step.py --device cuda --background > $OUT/eplbstep.log 2>&1
             head -14 $OUT/eplbstep.log ;;
    qmoe)    QMOE_SWEEP_BUDGET_S=${QMOE_SWEEP_BUDGET_S:-120} timeout 300 python3 bench/bench_kernels.py --only qmoe \
               > $OUT/qmoe.log 2>&1; grep -E "qmoe sweep|^\|" $OUT/qmoe.log | tail -30 ;;
    fp4serve) timeout 480 python3 bench/bench_serve.py --device cuda --preset flash --num-layers 8 --concurrency 64 \
               --output-len 64 --eplb-modes off --sampling greedy sampled --expert-dtype bf16 fp4 > $OUT/fp4serve.log 2>&1
             tail -12 $OUT/fp4serve.log ;;
    fp4eplb) # #16: EPLB on with fp4 experts at released width (sampled): quantised slots moved between steps
             timeout 560 python3 bench/bench_serve.py --device cuda --preset flash --num-layers 8 --concurrency 64 \
               --output-len 128 --requests-per-client 2 --eplb-modes off slots on --sampling sampled --expert-dtype fp4 \
               --eplb-period 50 > $OUT/fp4eplb.log 2>&1; grep -A 12 "^experts" $OUT/fp4eplb.log ;;
    decodeflash) # #16: what a released-width decode step spends its time on, bf16 vs fp4 experts (C = 64)
             for e in bf16 fp4; do
               timeout 240 python3 bench/bench_decode_gpu.py --preset flash --num-layers 8 --expert-dtype $e --batch 64 \
                 --prompt 32 --steps 20 --profile > $OUT/decodeflash_$e.log 2>&1; tail -34 $OUT/decodeflash_$e.log
             done ;;
    ncufp4)  # #16: issue and pipe utilisation of the fp4 decode kernels (Nsight Compute on the device image)
             M=sm__inst_issued.avg.pct_of_peak_sustained_active,sm__pipe_alu_cycles_active.avg.pct_of_peak_sustained_active
             M=$M,sm__pipe_fma_cycles_active.avg.pct_of_peak_sustained_active,sm__pipe_fmaheavy_cycles_active.avg.pct_of_peak_sustained_active
             M=$M,sm__inst_executed_pipe_lsu.avg.pct_of_peak_sustained_active
             M=$M,sm__warps_active.avg.pct_of_peak_sustained_active,dram__throughput.avg.pct_of_peak_sustained_elapsed,gpu__time_duration.sum
             timeout 200 ncu --clock-control none -k 'regex:^_moe_(up|down)_kernel$' --launch-skip 6 --launch-count 2 \
               --metrics $M python3 bench/ncu_fp4_decode.py --warmup 3 > $OUT/ncufp4.log 2>&1
             grep -v "^==PROF==" $OUT/ncufp4.log | tail -32 ;;
    capacity) timeout 300 python3 bench/bench_fp4_capacity.py --time-budget-s 200 > $OUT/capacity.log 2>&1
             tail -25 $OUT/capacity.log ;;
  esac
done
