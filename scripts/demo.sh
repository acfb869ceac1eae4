#!/usr/bin/env bash
# make demo: transcribe the bundled sample to captions, then serve the bundled model and stream
# the same sample through the WebSocket protocol so live captions appear.
set -euo pipefail
cd "$(dirname "$0")/.."
ASR=.venv/bin/asr
out=build/demo
mkdir -p "$out"
sample=samples/demo.flac

echo "== asr transcribe $sample"
"$ASR" transcribe "$sample" --output-dir "$out" --format srt --quiet
cat "$out/demo.srt"

echo "== asr serve (bundled model), then asr stream --realtime"
log="$out/server.log"
"$ASR" serve --port 0 > "$log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null || true; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do  # wait for the model to load (up to 30 s)
  grep -q "^listening on" "$log" && break
  sleep 0.1
done
url=$(sed -n 's/^listening on \(ws:\/\/[^/]*\)\/.*/\1/p' "$log")
[ -n "$url" ] || { echo "server did not start:"; cat "$log"; exit 1; }
echo "server: $url/v1/stream   (Vosk clients: $url/vosk, health: ${url/ws:/http:}/healthz)"
"$ASR" stream "$sample" --url "$url" --realtime
echo
echo "Live captions from your microphone: $ASR serve   (then, in another terminal)   $ASR mic --url ws://127.0.0.1:8765"
