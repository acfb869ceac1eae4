"""Choose the word LM's weight and word score on a dev set: WER over a grid, and greedy's.

The model runs once; every grid point decodes the same log-probabilities the way `asr eval` does
(greedy segments, each decoded again by the beam search).

    python bench/lm_tune.py --data DEV [--model models/default] [--lm models/default/lm]
        [--lm-weights 1.5 2 2.5] [--word-scores -1 0 1] [--beam-size 64]
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import torch

from asr import DEFAULT_MODEL_DIR
from asr.audio import load_audio
from asr.checkpoint import load_model
from asr.data import read_source
from asr.decoding import decode
from asr.evaluate import ErrorCounts, score
from asr.lm import BeamConfig, BeamSearch, SegmentRescorer
from asr.recognizer import batch_log_probs
from asr.text import normalize


def log_probs(model_dir: Path, data: Path, batch: int = 16) -> list[tuple[str, torch.Tensor]]:
    model, _ = load_model(model_dir)
    utts = read_source(data).utterances
    out = []
    for i in range(0, len(utts), batch):
        group = utts[i : i + batch]
        lps = batch_log_probs(model, [load_audio(u.audio) for u in group])
        out += [(normalize(u.text), lp) for u, lp in zip(group, lps, strict=True)]
    return out


def wer(items: list[tuple[str, torch.Tensor]], search: BeamSearch | None) -> float:
    counts = ErrorCounts()
    for ref, lp in items:
        hyp = decode(lp, rescorer=SegmentRescorer(search) if search else None).text
        counts += score(ref, normalize(hyp))[0]
    return 100 * counts.errors / max(1, counts.ref_len)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    p.add_argument("--lm", type=Path, default=DEFAULT_MODEL_DIR / "lm")
    p.add_argument("--lm-weights", type=float, nargs="+", default=[1.5, 2.0, 2.5])
    p.add_argument("--word-scores", type=float, nargs="+", default=[-1.0, 0.0, 1.0])
    p.add_argument("--beam-size", type=int, default=BeamConfig.beam_size)
    args = p.parse_args()
    torch.set_num_threads(2)
    with torch.inference_mode():
        items = log_probs(args.model, args.data)
    print(f"{args.data}: {len(items)} utterances; greedy WER {wer(items, None):.2f} %")
    print("| LM weight | word score | WER | decoding s |\n|---|---|---|---|")
    for weight, word_score in itertools.product(args.lm_weights, args.word_scores):
        search = BeamSearch(args.lm, BeamConfig(beam_size=args.beam_size, lm_weight=weight, word_score=word_score))
        start = time.perf_counter()
        result = wer(items, search)
        print(f"| {weight:g} | {word_score:g} | {result:.2f} % | {time.perf_counter() - start:.1f} |", flush=True)


if __name__ == "__main__":
    main()
