"""Build the evaluation sets of the model card (models/default/README.md) under OUT:

- synth/test.jsonl          held-out sentences, voices seen in training (espeak-ng + flite)
- synth/test-heldout.jsonl  held-out sentences and held-out voices (all three engines)
- speechocean762-dev/transcripts.tsv   the 10 speechocean762 speakers kept out of training
- fsdd-test/transcripts.tsv            FSDD recordings with index 0-4 (the customary test split)

    python scripts/make_eval_sets.py --out build/eval
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPEECH = ROOT.parent / "shared" / "data" / "speech"


def dev_speakers() -> set[str]:
    config = tomllib.loads((ROOT / "configs" / "default.toml").read_text())
    return {s for src in config["data"]["dev"] for s in src.get("only_speakers", [])}


def subset_tsv(source: Path, out: Path, keep) -> int:
    """Copy the rows of `source` (a transcripts.tsv) that `keep(row)` accepts, with absolute paths."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with source.open(newline="") as f, out.open("w", newline="") as g:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        writer = csv.DictWriter(g, reader.fieldnames, delimiter="\t", quoting=csv.QUOTE_NONE)
        writer.writeheader()
        rows = [r | {"path": str((source.parent / r["path"]).resolve())} for r in reader if keep(r)]
        writer.writerows(rows)
    return len(rows)


def synth(out: Path, *args: str) -> None:
    cmd = [sys.executable, "-m", "asr", "synth", "--out", str(out), "--split", "test", "--seed", "7", *args]
    subprocess.run(cmd, check=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "build" / "eval")
    p.add_argument("--hours", type=float, default=0.3, help="hours of each synthetic test set")
    args = p.parse_args()
    speakers = dev_speakers()
    n = subset_tsv(
        SPEECH / "speechocean762-train" / "transcripts.tsv",
        args.out / "speechocean762-dev" / "transcripts.tsv",
        lambda r: r["speaker"] in speakers,
    )
    print(f"speechocean762 dev: {n} utterances of {len(speakers)} speakers")
    n = subset_tsv(
        SPEECH / "fsdd" / "transcripts.tsv",
        args.out / "fsdd-test" / "transcripts.tsv",
        lambda r: int(r["utt_id"].rsplit("_", 1)[1]) <= 4,
    )
    print(f"fsdd test: {n} utterances")
    synth(args.out / "synth", "--hours", str(args.hours), "--engines", "espeak,flite")
    synth(args.out / "synth", "--hours", str(args.hours), "--holdout-voices")


if __name__ == "__main__":
    main()
