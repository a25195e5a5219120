#!/usr/bin/env bash
# The GPU half of the speed work, as one script for a short lease of a GPU machine:
#
#   1. step_bench.py on the GPU: every method's train_step against the floor of its encoder
#      passes (ResNet-18, CIFAR stem, 32x32, batch 128, as on the CPU);
#   2. throughput.py: images/s of MoCo v2 and SimCLR, ResNet-18 at 32x32 (batch 256), under fp32,
#      bf16, bf16 + channels_last and bf16 + channels_last + compile, in one run;
#   3. the same for MoCo v2 with ResNet-50 at 224x224 (batch 128);
#   4. real `cl run`s with the training set resident on the GPU: the shipped recipes/moco.toml
#      in fp32, and a ResNet-18 32x32 MoCo v2 run on 20,000 glyphs in fp32 and with bf16,
#      channels_last and compile;
#   5. the stages after pretraining on the GPU: `cl eval` of the default run with fine-tuning on
#      1% and 10% of the labels, the linear probe, supervised from scratch and distillation.
#
# Each part has its own time limit, so one that runs long leaves the others their time.
# Results (markdown in log.txt, JSON beside it) go to $OUT (default runs/gpu-bench).
#     bash benchmarks/gpu.sh
set -uo pipefail

PY=${PY:-python3}
OUT=${OUT:-runs/gpu-bench}
RUNS=${RUNS:-/tmp/cltool-gpu-runs}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
LOG="$OUT/log.txt"

part() { echo -e "\n# $1 ($(date -u +%T))" | tee -a "$LOG"; }

# summaries ROOT GLOB JSON KEY...: every summary.json under ROOT matching GLOB into one JSON
# file (keyed by its folder below ROOT), and a line each with the KEYs.
summaries() {
    "$PY" - "$@" <<'EOF' | tee -a "$LOG"
import json, sys
from pathlib import Path
root, pattern, out, *keys = sys.argv[1:]
found = {str(p.parent.relative_to(root)): json.loads(p.read_text())
         for p in sorted(Path(root).glob(pattern))}
Path(out).write_text(json.dumps(found, indent=1))
for name, summary in found.items():
    print(name, {key: summary.get(key) for key in keys})
EOF
}

part "machine"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__)"
} 2>&1 | tee -a "$LOG"

part "1. step_bench: every method against its floor"
timeout 150 "$PY" benchmarks/step_bench.py --device cuda --repeats 7 --no-lightly \
    --json "$OUT/step_cuda.json" 2>&1 | grep -v "round .* done" | tee -a "$LOG"

part "2. throughput: ResNet-18, 32x32, batch 256"
timeout 140 "$PY" benchmarks/throughput.py --device cuda --json "$OUT/throughput_r18.json" \
    2>&1 | tee -a "$LOG"

part "3. throughput: ResNet-50, 224x224, batch 128"
timeout 140 "$PY" benchmarks/throughput.py --device cuda --backbone resnet50 --image-size 224 \
    --batch 128 --num-train 2048 --recipes moco --repeats 3 --json "$OUT/throughput_r50.json" \
    2>&1 | tee -a "$LOG"

part "4. cl run on the GPU"
resnet18=(--set model.backbone=resnet18 --set model.small_stem=true --set data.image_size=32
    --set data.num_train=20000 --set epochs=10 --set eval.every_epochs=0)
fast=(--set train.precision=bf16 --set train.channels_last=true --set train.compile=true)
timeout 50 "$PY" -m cltool run recipes/moco.toml --set train.device=cuda --out "$RUNS/default" --force \
    2>&1 | tail -n 25 | tee -a "$LOG"
timeout 60 "$PY" -m cltool run recipes/moco.toml --set train.device=cuda "${resnet18[@]}" \
    --out "$RUNS/resnet18_fp32" --force 2>&1 | tail -n 25 | tee -a "$LOG"
timeout 100 "$PY" -m cltool run recipes/moco.toml --set train.device=cuda "${resnet18[@]}" "${fast[@]}" \
    --out "$RUNS/resnet18_fast" --force 2>&1 | tail -n 25 | tee -a "$LOG"
summaries "$RUNS" '*/*/*/summary.json' "$OUT/runs.json" imgs_per_s wall_s knn_top1 linear_top1
part "5. cl eval on the GPU: the stages of the default run"
default_run=$(dirname "$(find "$RUNS/default" -name summary.json | head -1)")
timeout 90 "$PY" -m cltool eval "$default_run" --finetune 0.01,0.1 --linear --supervised \
    --distill 2>&1 | tail -n 30 | tee -a "$LOG"
summaries "$default_run" 'stages/*/summary.json' "$OUT/stages.json" top1 wall_s imgs_per_s device
part "done"
