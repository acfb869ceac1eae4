#!/usr/bin/env bash
# Stage 2 of the default model on the GPU machine (device tool), in calls that each fit its 10-minute limit:
#   synth   carry .whl .tts .text .data/fsdd       make the synthetic corpus (60 planned hours + dev) on 16 cores
#   train   carry .data/speechocean762-train       train from models/default, or resume, for up to 540 s; SIGTERM
#                                                   saves a checkpoint
#   export  (no carry)                              the newest checkpoint as float16 into $OUT/model, plus curves
set -euo pipefail
source scripts/device_env.sh
case "${1:?usage: device_stage2.sh synth|train|export}" in
  synth)
    text=.text/sentences.norm.txt.xz
    time python3 -m asr synth --out data/synth --hours 60 --split train --engines espeak,flite --jobs 16 --text $text
    time python3 -m asr synth --out data/synth --hours 0.6 --split dev --engines espeak,flite --jobs 16 --text $text
    ;;
  train)
    timeout -s TERM "${2:-540}" python3 -m asr train --config configs/default-stage2.toml --init-from models/default \
      --resume runs/stage2 -q || true
    tail -n 4 runs/stage2/metrics.csv
    ;;
  export)
    python3 - <<'PY'
import json, os, torch
from pathlib import Path
from asr.checkpoint import load_model, save_model
from training.state import latest_checkpoint
ckpt = latest_checkpoint(Path("runs/stage2"))
model, config = load_model(ckpt)
info = config.info | {"stage2_checkpoint": ckpt.name}
save_model(model, Path(os.environ["OUT"]) / "model", info=info, dtype=torch.float16)
print("exported", ckpt)
PY
    cp runs/stage2/metrics.csv runs/stage2/data.json "$OUT/"
    ;;
esac
