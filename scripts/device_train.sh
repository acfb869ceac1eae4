#!/usr/bin/env bash
# Continue training the default model on the GPU machine (device tool), in calls that each fit its
# 10-minute limit. CONFIG is a stage config (configs/default-stage2.toml ... configs/default-stage7.toml);
# its [run] out_dir is the run directory.
#   synth  [SEED] [HOURS]  carry .whl .tts .text .data/fsdd  make the synthetic corpus (HOURS planned, default 60,
#                                                           + dev) on 16 cores; a new seed gives new sentences
#   train  [SECS]   carry .data/speechocean762-train       train from models/default, or resume, for up to
#                                                           SECS (540); SIGTERM saves a checkpoint. When the
#                                                           checkout and the corpus exceed what a call carries,
#                                                           carry .data/parts/* (scripts/split_for_carry.sh) over
#                                                           several calls: train merges them first
#   export          (no carry)                              the newest checkpoint as float16 into $OUT/model,
#                                                           plus the run's curves
# Example: bash scripts/device_train.sh configs/default-stage5.toml synth 3 60, then ... train 540
set -euo pipefail
source scripts/device_env.sh
config=${1:?usage: device_train.sh CONFIG synth [SEED [HOURS]]|train [SECS]|export}
run=$(python3 -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["run"]["out_dir"])' "$config")
case "${2:?usage: device_train.sh CONFIG synth [SEED [HOURS]]|train [SECS]|export}" in
  synth)
    text=.text/sentences.norm.txt.xz
    seed=${3:-0}
    time python3 -m asr synth --out data/synth --hours "${4:-60}" --split train --engines espeak,flite --jobs 16 \
      --text $text --seed "$seed"
    time python3 -m asr synth --out data/synth --hours 0.6 --split dev --engines espeak,flite --jobs 16 --text $text
    ;;
  train)
    for part in .data/parts/*-[0-9]*; do
      [ -d "$part" ] || continue
      corpus=.data/$(basename "$part" | sed 's/-[0-9]*$//')
      mkdir -p "$corpus/audio"
      cp -n "$part/transcripts.tsv" "$corpus/"
      cp -n "$part"/audio/* "$corpus/audio/"
    done
    timeout -s TERM "${3:-540}" python3 -m asr train --config "$config" --init-from models/default \
      --resume "$run" -q || true
    tail -n 4 "$run/metrics.csv"
    ;;
  export)
    RUN="$run" python3 - <<'PY'
import os
from pathlib import Path

import torch

from asr.checkpoint import load_model, save_model
from training.state import latest_checkpoint

ckpt = latest_checkpoint(Path(os.environ["RUN"]))
model, config = load_model(ckpt)
info = config.info | {f"{Path(os.environ['RUN']).name}_checkpoint": ckpt.name}
save_model(model, Path(os.environ["OUT"]) / "model", info=info, dtype=torch.float16)
print("exported", ckpt)
PY
    cp "$run/metrics.csv" "$run/data.json" "$OUT/"
    ;;
  *)
    echo "unknown step $2 (synth|train|export)" >&2
    exit 2
    ;;
esac
