#!/usr/bin/env bash
# Issue 18's GPU measurements in one run, for a short lease on a lent GPU machine: the GPU tests,
# then what is still unmeasured, in order of importance: one line's step with and without the
# backbone's CUDA graph, then with the bank stack compiled too (torch.compile), 1024 px frames
# resized with PIL and on the GPU, replay with backbone batching, AFR-CLIP's step, lines sharing
# the GPU through the Ray pipeline with CUDA graphs, the pipeline alone (a detector that does no
# work: the host's ceiling; then one whose step sleeps 25 ms: what the pipeline adds to a step),
# one line timed only once its banks are full (from frame FULL_FROM: N_I,max = 200 PSM rows; the
# lines above are timed while their PSM still grows), the lines under CUDA MPS (where the
# machine has it), the remaining precisions. Each gets at most its own time limit and what is
# left before DEADLINE_S, so a late step is cut, not the whole run. Logs and JSON records go to
# $OUT (default ./gpu-suite-out).
#
#   bash benchmarks/gpu_suite.sh                  # on the GPU machine, paper configs, random weights
#   SMOKE=1 bash benchmarks/gpu_suite.sh          # here, on CPU with the tiny configs: the script runs
# A machine without ray, open_clip and pydantic takes them as wheels: `python benchmarks/lease_wheels.py`
# here, then carry .whl and install it there first (docs/BENCHMARKS.md, "On an NVIDIA H200").
set -u
OUT=${OUT:-gpu-suite-out}
mkdir -p "$OUT/logs"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_DISABLE=1
START=$(date +%s)
DEADLINE_S=${DEADLINE_S:-560}
JSON="$OUT/records.json"

if [ "${SMOKE:-0}" = 1 ]; then
  RARECLIP=configs/detector-tiny.yaml; AFRCLIP=afrclip-tiny
  DEVICE=cpu; STEPS=5; FRAMES=8; LINES="1 2"; BATCHES="1 4"; REPLAY_FRAMES=8; SIDE=256; GPU_TESTS="RARECLIP_TEST_DEVICE=cpu"; FULL_FROM=20
else
  RARECLIP=configs/detector-paper.yaml; AFRCLIP=afrclip
  DEVICE=cuda; STEPS=50; FRAMES=30; LINES="16"; BATCHES="8 32"; REPLAY_FRAMES=96; SIDE=1024; GPU_TESTS=""; FULL_FROM=205
fi

step() {  # step NAME LIMIT_S COMMAND...: run with the smaller of LIMIT_S and the time left
  local name=$1 limit=$2; shift 2
  local left=$((DEADLINE_S - ($(date +%s) - START)))
  if [ "$left" -lt 20 ]; then echo "SKIPPED $name (${left}s left)" | tee -a "$OUT/summary.txt"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$(date +%s)
  timeout "$limit" "$@" >"$OUT/logs/$name.log" 2>&1
  local rc=$?
  local said=$(grep -E '^profile [a-z]+:|^compiled banks:|p50_ms=|max_score_diff=|aggregate_img_s=|replay_one_line|[0-9]+ (passed|failed)' "$OUT/logs/$name.log" | tr '\n' ' ' | cut -c1-700)
  [ "$rc" -ne 0 ] && said="$said last line: $(tail -n 1 "$OUT/logs/$name.log" | cut -c1-300)"  # why it failed, without the archive
  echo "$name rc=$rc $(( $(date +%s) - t0 ))s: $said" | tee -a "$OUT/summary.txt"
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1
  python3 -c "import torch, ray, open_clip; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'ray', ray.__version__, 'open_clip', open_clip.__version__)"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

S="python3 benchmarks/step_latency.py --config $RARECLIP --pretrained none --device $DEVICE --steps $STEPS --warmup 5 --fill --json $JSON"
P="python3 benchmarks/pipeline_throughput.py --config $RARECLIP --pretrained none --size $SIDE --json $JSON"  # MVTec-sized PNGs
# first what no run has measured yet (2026-12-04's run measured the rest: docs/BENCHMARKS.md)
step gpu-tests 120 env $GPU_TESTS python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider
step step-iprb-fp16-f32 90 $S --precision fp16 --bank-dtype float32 --profile "$OUT/logs/profile-eager"
step step-iprb-fp16-f32-graphs 90 $S --precision fp16 --bank-dtype float32 --cuda-graphs --profile "$OUT/logs/profile-graphs"
step step-iprb-fp16-f32-graphs-compiled 150 $S --precision fp16 --bank-dtype float32 --cuda-graphs --compile-banks --profile "$OUT/logs/profile-compiled"
step step-1024-pil 75 $S --precision fp16 --bank-dtype float32 --cuda-graphs --frame-size 1024
step step-1024-resize-on-device 75 $S --precision fp16 --bank-dtype float32 --cuda-graphs --frame-size 1024 --resize-on-device
step replay 150 $P --frames $REPLAY_FRAMES --lines --replay-batches $BATCHES
step kind-afrclip 60 python3 benchmarks/detector_latency.py --config "configs/detector-$AFRCLIP.yaml" --pretrained none \
  --device $DEVICE --frames 30 --warmup 5 --json "$JSON"
step lines-graphs 150 $P --frames $FRAMES --lines $LINES --replay-batches --cuda-graphs --resize-on-device --ingest-actors 4
step pipeline-alone 90 $P --no-model --frames 120 --lines $LINES --replay-batches 1 8 --ingest-actors 4
step pipeline-probe-25ms 45 $P --no-model --probe-step-ms 25 --frames 120 --lines 1 --replay-batches
step line-full-banks 60 $P --frames $((FULL_FROM + 30)) --warmup-frames $FULL_FROM --lines 1 --replay-batches --cuda-graphs --resize-on-device
mps_step() {  # mps_step NAME LIMIT_S COMMAND...: `step` with one CUDA MPS daemon of our own for its processes
  if ! command -v nvidia-cuda-mps-control >/dev/null; then echo "SKIPPED $1 (no nvidia-cuda-mps-control)" | tee -a "$OUT/summary.txt"; return; fi
  export CUDA_MPS_PIPE_DIRECTORY=$(mktemp -d) CUDA_MPS_LOG_DIRECTORY=$(mktemp -d)  # Ray's workers inherit both
  if nvidia-cuda-mps-control -d; then
    step "$@"
    echo quit | nvidia-cuda-mps-control
    cp "$CUDA_MPS_LOG_DIRECTORY/control.log" "$OUT/logs/$1-mps-control.log" 2>/dev/null
  else
    echo "SKIPPED $1 (the MPS daemon did not start)" | tee -a "$OUT/summary.txt"
  fi
  unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
}
mps_step lines-graphs-mps 150 $P --frames $FRAMES --lines $LINES --replay-batches --cuda-graphs --resize-on-device --ingest-actors 4
step step-dprb-fp16-f16 75 $S --precision fp16 --bank-dtype float16 --branch dprb
step step-iprb-fp32-f32 75 $S --precision fp32 --bank-dtype float32
tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$OUT/logs"  # few files come back from a lease: one archive
echo "total $(( $(date +%s) - START ))s" | tee -a "$OUT/summary.txt"
