#!/usr/bin/env bash
# DDP speedup on the 2-GPU machine (device tool, kind nvidia-h200-x2; carry .whl .tts .text):
# the same training recipe (configs/default-stage4.toml: compiled blocks; synthetic data only) run
# with torchrun on 1 GPU, then on 2, for STEPS steps each from models/default's weights. Each run's
# metrics.csv (audio seconds per second, counted over all ranks) goes to $OUT, and the median and
# time-weighted rates of its 25-step windows after the first two (compile, cache warm-up) are printed
# (bench/run_throughput.py).
#   bash scripts/device_ddp.sh [STEPS] [HOURS]
set -euo pipefail
source scripts/device_env.sh
steps=${1:-300}
hours=${2:-20}
text=.text/sentences.norm.txt.xz
jobs=$(nproc)
python3 -m asr synth --out data/synth --hours "$hours" --split train --engines espeak,flite --jobs "$jobs" --text $text
python3 -m asr synth --out data/synth --hours 0.1 --split dev --engines espeak,flite --jobs "$jobs" --text $text
for n in 1 2; do
  config=/tmp/ddp$n.toml
  python3 - "$config" "runs/ddp$n" <<'PY'
import re, sys
from pathlib import Path
text = Path("configs/default-stage4.toml").read_text()
train = '[{ path = "data/synth/train.jsonl", weight = 1.0 }]'
dev = '[{ path = "data/synth/dev.jsonl" }]'
text = re.sub(r"(?ms)^train = \[.*?^\]\n", f"train = {train}\n", text)
text = re.sub(r"(?ms)^dev = \[.*?^\]\n", f"dev = {dev}\n", text)
text = re.sub(r'(?m)^out_dir = .*$', f'out_dir = "{sys.argv[2]}"', text)
text = re.sub(r"(?m)^eval_every = .*$", "eval_every = 100000", text)
Path(sys.argv[1]).write_text(text)
PY
  time torchrun --standalone --nproc-per-node "$n" -m training --config "$config" --init-from models/default \
    --until-step "$steps" -q
  cp "runs/ddp$n/metrics.csv" "$OUT/metrics_${n}gpu.csv"
  echo -n "$n GPU(s): "
  python3 bench/run_throughput.py "runs/ddp$n/metrics.csv"
done
