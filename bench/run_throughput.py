"""Training throughput of a run, from its metrics.csv: the median and the time-weighted audio seconds per second of
the 25-step windows (`run.log_every`), leaving out the first two windows of each call (compilation, cache warm-up;
`elapsed_s` restarts when a call resumes the run) and the windows that decoded the dev set.

    python bench/run_throughput.py RUN_DIR/metrics.csv [...]
"""

from __future__ import annotations

import argparse
import csv
import statistics
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Window:
    rate: float  # audio seconds per second
    seconds: float


@dataclass(frozen=True)
class Throughput:
    median: float
    time_weighted: float
    windows: int


def windows(path: Path) -> list[Window]:
    """The timed windows of one metrics.csv, per the module docstring."""
    rows = [r for r in csv.DictReader(path.open()) if r["audio_s_per_s"]]
    out, since_start = [], 0
    for before, row in zip([None, *rows], rows, strict=False):
        span = float(row["elapsed_s"]) - float(before["elapsed_s"]) if before else -1.0
        since_start = since_start + 1 if span > 0 else 0  # a new call: elapsed_s restarted
        if since_start >= 2 and not row["dev_wer"]:
            out.append(Window(float(row["audio_s_per_s"]), span))
    return out


def throughput(path: Path) -> Throughput:
    timed = windows(path)
    if not timed:
        raise SystemExit(f"{path}: no timed windows after the first two of a call")
    weighted = sum(w.rate * w.seconds for w in timed) / sum(w.seconds for w in timed)
    return Throughput(statistics.median(w.rate for w in timed), weighted, len(timed))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("metrics", type=Path, nargs="+", help="metrics.csv files of training runs")
    for path in p.parse_args().metrics:
        t = throughput(path)
        print(f"{path}: median {t.median:,.0f} audio-s/s, time-weighted {t.time_weighted:,.0f}, {t.windows} windows")


if __name__ == "__main__":
    main()
