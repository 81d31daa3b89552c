#!/usr/bin/env bash
# `builder train` under torchrun with NCCL on this machine's GPUs: 2 epochs on digits (bundled with
# scikit-learn, so no network), one process per GPU, 1 and (with 2 GPUs or more) 2 processes.
# Prints each run's result line and its per-epoch metrics; exits non-zero if a run fails.
# Usage: scripts/gpu_ddp_smoke.sh [OUT_DIR]   (run from the repository root; PYTHON overrides .venv/bin/python)
set -euo pipefail

out=${1:-runs/gpu-ddp-smoke}
python=${PYTHON:-.venv/bin/python}
torchrun=$(dirname "$python")/torchrun
export PYTHONPATH=${PYTHONPATH:-$PWD}

gpus=$("$python" -c 'import torch; print(torch.cuda.device_count())')
if [ "$gpus" -lt 1 ]; then
    echo "gpu_ddp_smoke: no CUDA GPU visible; nothing to check" >&2
    exit 1
fi
counts="1"
if [ "$gpus" -ge 2 ]; then counts="1 2"; fi

for n in $counts; do
    run="$out/nproc-$n"
    rm -rf "$run"
    echo "== torchrun --nproc-per-node $n (NCCL, $gpus GPU(s) visible)"
    "$torchrun" --standalone --nproc-per-node "$n" -m builder train \
        --dataset digits --epochs 2 --batch-size 64 --out "$run" | tail -n 1
    "$python" - "$run" <<'PY'
import json
import sys
from pathlib import Path

run = Path(sys.argv[1])
config = json.loads((run / "config.json").read_text())
assert config.get("distributed", {}).get("backend") == "nccl", config.get("distributed")
for record in json.loads((run / "metrics.json").read_text()):
    print(
        f"epoch {record['epoch']}: train loss {record['train_loss']:.4f}, "
        f"val accuracy {record['val_accuracy']:.4f}, {record['seconds']} s"
    )
print(f"{config['distributed']}, device {config['device']}")
PY
done
