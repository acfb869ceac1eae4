"""Real-time factor and peak RSS of `asr transcribe` on the CPU, for 1 and 60 minutes of audio.

Uses the default model architecture with random weights (the model's speed does not depend on
training), or `--model DIR`, decoded as `asr transcribe` decodes it (with its word LM, if it has
one). Each measurement is a fresh `asr transcribe` process; its peak RSS comes from wait4().

    python bench/transcribe_cpu.py [--minutes 1 60] [--chunk-ms 1000] [--threads 2] [--model DIR]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import soundfile as sf

SR = 16_000
SENTENCES = [
    "The streaming server carries each stream's recurrent state between audio chunks.",
    "An hour of audio should need no more memory than a minute of it.",
    "Captions appear while the speaker is still talking.",
]


def speech_clip() -> np.ndarray:
    """About ten seconds of espeak-ng speech with pauses, at 16 kHz."""
    pieces = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, text in enumerate(SENTENCES):
            path = Path(tmp) / f"{i}.wav"
            subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(path), text], check=True)
            audio, sr = sf.read(path, dtype="float32")
            idx = np.round(np.arange(0, len(audio) * SR / sr) * sr / SR).astype(int).clip(0, len(audio) - 1)
            pieces += [audio[idx], np.zeros(SR // 2, np.float32)]
    return np.concatenate(pieces)


def write_long_file(path: Path, minutes: float, clip: np.ndarray) -> None:
    """Write `minutes` of audio by repeating the clip, block by block (never all in memory)."""
    total = int(minutes * 60 * SR)
    with sf.SoundFile(str(path), "w", SR, 1, subtype="PCM_16", format="FLAC") as f:
        written = 0
        while written < total:
            block = clip[: total - written]
            f.write(block)
            written += len(block)


def run_transcribe(audio: Path, model: Path, out: Path, chunk_ms: int, threads: int) -> tuple[float, float]:
    """Returns (wall seconds, peak RSS in MiB) of one `asr transcribe` process."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "asr", "transcribe", str(audio), "--model", str(model), "-o", str(out)]
    cmd += ["-f", "json", "--chunk-ms", str(chunk_ms), "-q"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"asr transcribe failed on {audio}")
    return wall, usage.ru_maxrss / 1024  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, nargs="+", default=[1, 60])
    parser.add_argument("--chunk-ms", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", type=Path, help="a model directory (default: random weights, no LM)")
    args = parser.parse_args()
    if shutil.which("espeak-ng") is None:
        raise SystemExit("espeak-ng is missing: run `make setup`")

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        model = args.model
        if model is None:
            model = tmp / "model"
            subprocess.run([sys.executable, "-m", "asr", "init-model", str(model)], check=True)
        clip = speech_clip()
        rows = []
        for minutes in args.minutes:
            audio = tmp / f"audio_{minutes:g}min.flac"
            write_long_file(audio, minutes, clip)
            wall, rss = run_transcribe(audio, model, tmp / "out", args.chunk_ms, args.threads)
            rows.append((minutes, wall, wall / (minutes * 60), rss))
            print(f"{minutes:g} min: {wall:.1f} s, RTF {wall / (minutes * 60):.4f}, peak RSS {rss:.0f} MiB", flush=True)

    print(
        f"\n{date.today()} · {platform.processor() or platform.machine()} · {os.cpu_count()} cores · "
        f"threads={args.threads} · chunk-ms={args.chunk_ms} · {args.model or 'default dims, random weights'}\n"
    )
    print("| audio | wall time | RTF | RTFx | peak RSS |\n|---|---|---|---|---|")
    for minutes, wall, rtf, rss in rows:
        print(f"| {minutes:g} min | {wall:.1f} s | {rtf:.4f} | {1 / rtf:.0f}x | {rss:.0f} MiB |")
    if len(rows) > 1:
        growth = rows[-1][3] / rows[0][3] - 1
        print(f"\nPeak RSS, {rows[-1][0]:g} min vs {rows[0][0]:g} min: {growth:+.1%} (target: within 10%)")


if __name__ == "__main__":
    main()
