#!/usr/bin/env bash
# The prepared check of the CUDA path, for the first GPU machine (about 8 minutes on one recent GPU):
#   1. the tests that need CUDA (AMP against the CPU, DDP's NCCL set-up is exercised by the run below);
#   2. shared_throughput.py and exact_throughput.py on CUDA (bf16 autocast, channels_last);
#   3. a devtrain -> devval run of the default recipe from an empty cache (benchmarks/full_run.py);
# then one table: patches/s, images/s, epoch seconds, mAP. Everything it prints is kept in $LOG.
#
#   bash benchmarks/gpu_check.sh                # needs ../shared/data/VOCdevkit/VOC2007 and make install
#   PY=python VOC=/data/VOC2007 bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
VOC=${VOC:-../shared/data/VOCdevkit/VOC2007}
WORK=$(mktemp -d)
LOG=${LOG:-$WORK/gpu_check.log}
trap 'echo "log: $LOG"' EXIT
"$PY" - <<'PY'
import torch
if not torch.cuda.is_available():
    raise SystemExit("gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine")
print("GPU:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
PY

step() { echo; echo "== $1"; }
{
  step "CUDA tests"
  "$PY" -m pytest -q -p no:cacheprovider tests/test_extract.py -k cuda
  step "shared-mode throughput (cuda)"
  "$PY" benchmarks/shared_throughput.py --voc "$VOC" --images 80
  step "exact-mode throughput (cuda)"
  "$PY" benchmarks/exact_throughput.py --voc "$VOC" --images 8 --batch 128
  step "devtrain -> devval, default recipe, empty cache (cuda)"
  "$PY" benchmarks/full_run.py --voc "$VOC" --cache-dir "$WORK/cache" --output "$WORK/runs"
} 2>&1 | tee "$LOG" | grep -av "it/s\]\|img/s\]\|batch/s"

epoch_s=$("$PY" - "$WORK/runs" <<'PY'
import sys
from pathlib import Path
from patchnet.checkpoint import load_checkpoint
last = next(Path(sys.argv[1]).rglob("last.pt"))
seconds = [r["seconds"] for r in load_checkpoint(last).history]
print(f"{sum(seconds) / len(seconds):.1f}")
PY
)
tr '\r' '\n' < "$LOG" | awk -v epoch_s="$epoch_s" '
  /^\| exact mode pipeline/ { split($0, c, "|"); patches = c[3] }
  /^\| extractor on decoded images/ { split($0, c, "|"); images = c[3] }
  /^\| whole run/ { split($0, c, "|"); minutes = c[3] }
  /^devval mAP/ { map = $3 " / " $5 }
  END {
    print "\n| exact patches/s | shared images/s | epoch seconds | whole run (min) | devval mAP (11-pt / env) |"
    print "| --- | --- | --- | --- | --- |"
    printf "| %s | %s | %s | %s | %s |\n", patches, images, epoch_s, minutes, map
  }'
