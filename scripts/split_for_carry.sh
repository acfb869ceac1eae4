#!/usr/bin/env bash
# Split a corpus folder (transcripts.tsv + audio/) into N parts under .data/parts/, each small enough to
# carry to the GPU machine in its own device call (a call carries 64 MiB with the checkout). The parts hold
# hard links, not copies. On the device, `scripts/device_train.sh CONFIG train` merges the parts that
# earlier calls of the same lease carried back into the corpus folder.
#   bash scripts/split_for_carry.sh .data/speechocean762-train 2
#   -> carry .data/parts/speechocean762-train-1 (with .data/fsdd) in one call, then
#      .data/parts/speechocean762-train-2 with the first `train` call
set -euo pipefail
src=${1:?usage: split_for_carry.sh CORPUS_DIR N}
parts=${2:?usage: split_for_carry.sh CORPUS_DIR N}
name=$(basename "$src")
[ -f "$src/transcripts.tsv" ] && [ -d "$src/audio" ] || { echo "$src: expected transcripts.tsv and audio/" >&2; exit 2; }
rm -rf .data/parts/"$name"-*
mapfile -t files < <(ls "$src/audio")
for ((p = 1; p <= parts; p++)); do
  out=.data/parts/$name-$p
  mkdir -p "$out/audio"
  cp "$src/transcripts.tsv" "$out/"
  for ((i = p - 1; i < ${#files[@]}; i += parts)); do ln "$src/audio/${files[i]}" "$out/audio/"; done
  echo "$out: $(ls "$out/audio" | wc -l) files, $(du -sh "$out" | cut -f1)"
done
