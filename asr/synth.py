"""Synthetic speech corpora in the LibriSpeech layout, from every English TTS voice on the machine.

Engines (Debian packages): espeak-ng (English accents x voice variants), flite (built-in
voices) and festival (the festvox voices installed). A *speaker* is one voice: an engine, a
voice and, for espeak-ng, a variant; its number is a stable hash of that name, so it is the
same on every machine. Each utterance draws its own speaking rate, pitch and volume.

Output:  OUT/<speaker>/<chapter>/<speaker>-<chapter>-<NNNN>.flac
         OUT/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt
         OUT/<split>.jsonl   (NeMo manifest: audio_filepath, duration, text, + voice, prosody)

Splits never share a sentence: a sentence's split is fixed by a hash of its text. Held-out
voices (a fixed, hash-chosen tenth of the inventory) never appear in train or dev; the test
split uses them with `--holdout-voices`.
"""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import math
import multiprocessing as mp
import os
import random
import re
import shutil
import subprocess
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio
from tqdm import tqdm

from asr.features import SAMPLE_RATE
from asr.text import normalize

SPLITS = ("train", "dev", "test")
SPLIT_FRACTIONS = {"test": 0.02, "dev": 0.02}  # of sentences, by hash; the rest is train
SPLIT_CHAPTER = {"train": 1, "dev": 2, "test": 3}
HELDOUT_MODULUS = 10  # one voice in ten is held out
APT_PACKAGE = {"espeak": "espeak-ng", "flite": "flite", "festival": "festival (and festvox-* voices)"}
ENGINES = ("espeak", "flite", "festival")
ARCHAIC_SOURCES = ("The-Devil-s-Dictionary", "The-Complete-Angler", "News-from-Nowhere")
ARCHAIC_WEIGHT = 0.3
MAX_WORDS = 35
FLITE_F0 = {"kal": 105.0, "kal16": 105.0, "awb": 110.0, "rms": 105.0, "slt": 170.0}
FLITE_EXCLUDED = ("awb_time",)  # a limited-domain voice that only speaks clock times
FESTIVAL_VOICE_DIR = Path("/usr/share/festival/voices")
ENGINE_SHARE = {"espeak": 0.6, "flite": 0.25, "festival": 0.15}  # of utterances, over the engines in use
# Speaking rate relative to each voice's default. Faster speech does not fit character CTC at 40 ms
# frames: at 1.4x espeak-ng, 10 % of utterances needed more output frames than they had.
RATE_RANGE = (0.7, 1.15)
PITCH_RANGE = (0.8, 1.25)
WORDS_PER_SECOND = 2.6  # for planning hours before synthesis; the report gives measured hours


class SynthError(Exception):
    """A problem with the request or the machine (missing engine, no text, bad arguments)."""


@dataclass(frozen=True)
class Voice:
    engine: str  # espeak | flite | festival
    name: str  # espeak: "en-us+Alicia"; flite: "slt"; festival: "kal_diphone"

    @property
    def id(self) -> str:
        return f"{self.engine}:{self.name}"

    @property
    def speaker(self) -> int:
        """Stable LibriSpeech-style speaker number (the same on every machine)."""
        return 10_000_000 + int(hashlib.sha1(self.id.encode()).hexdigest()[:12], 16) % 90_000_000

    @property
    def held_out(self) -> bool:
        return int(hashlib.sha1(f"heldout:{self.id}".encode()).hexdigest()[:8], 16) % HELDOUT_MODULUS == 0


@dataclass(frozen=True)
class Prosody:
    rate: float  # speaking rate relative to the voice's default (>1 is faster)
    pitch: float  # pitch relative to the voice's default
    gain_db: float  # peak level in dBFS


@dataclass(frozen=True)
class Job:
    """One utterance to synthesize: everything needed, decided before any audio is made."""

    utt_id: str
    path: str  # relative to the corpus root
    text: str  # normalized transcript
    voice: Voice
    prosody: Prosody


# ---------------------------------------------------------------- voice inventory


def _run(cmd: list[str]) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def _espeak_voices() -> list[Voice]:
    """English accents (gmw voices; mbrola ones need extra packages) times every variant."""
    accents = sorted(
        {line.split()[1] for line in _run(["espeak-ng", "--voices=en"]).splitlines()[1:] if " gmw/" in line}
    )
    variants = sorted(
        {line.split()[4].removeprefix("!v/") for line in _run(["espeak-ng", "--voices=variant"]).splitlines()[1:]}
    )
    return [Voice("espeak", f"{a}+{v}") for a in accents for v in variants]


def _flite_voices() -> list[Voice]:
    listed = _run(["flite", "-lv"]).split(":", 1)[1].split()
    return [Voice("flite", v) for v in sorted(listed) if v not in FLITE_EXCLUDED]


def _festival_voices() -> list[Voice]:
    """festvox voices of English (US and British) installed under /usr/share/festival/voices."""
    found = []
    for lang in ("english", "us", "british"):
        folder = FESTIVAL_VOICE_DIR / lang
        if folder.is_dir():
            found += [Voice("festival", p.name) for p in sorted(folder.iterdir()) if p.is_dir()]
    return found


def engine_available(engine: str) -> bool:
    binary = {"espeak": "espeak-ng", "flite": "flite", "festival": "text2wave"}[engine]
    return shutil.which(binary) is not None


def list_voices(engines: tuple[str, ...] = ENGINES) -> list[Voice]:
    """Every voice of the given engines; a missing engine is an error naming its apt package."""
    missing = [e for e in engines if not engine_available(e)]
    if missing:
        raise SynthError(
            "TTS engine(s) not installed: "
            + ", ".join(f"{e} (apt package {APT_PACKAGE[e]})" for e in missing)
            + f". Install them, or choose others with --engines (installed: "
            f"{','.join(e for e in ENGINES if engine_available(e)) or 'none'})"
        )
    listers = {"espeak": _espeak_voices, "flite": _flite_voices, "festival": _festival_voices}
    voices = [v for e in engines for v in listers[e]()]
    if not voices:
        raise SynthError(f"no English voices found for engines {engines}")
    speakers = Counter(v.speaker for v in voices)
    clash = [v.id for v in voices if speakers[v.speaker] > 1]
    if clash:
        raise SynthError(f"speaker number collision between {clash}")
    return voices


# ---------------------------------------------------------------- sentences and splits


def sentence_split(text: str) -> str:
    """The split a sentence belongs to, fixed by its text alone."""
    u = int(hashlib.sha1(text.encode()).hexdigest()[:12], 16) / 16**12
    if u < SPLIT_FRACTIONS["test"]:
        return "test"
    if u < SPLIT_FRACTIONS["test"] + SPLIT_FRACTIONS["dev"]:
        return "dev"
    return "train"


def read_lines(path: Path) -> Iterator[str]:
    """The lines of a text file, `.xz` or plain, without their newlines."""
    opener = lzma.open if path.suffix == ".xz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        yield from (line.rstrip("\n") for line in f)


def load_sentences(path: Path, split: str) -> tuple[list[str], list[float]]:
    """Normalized, de-duplicated sentences of `split`, with sampling weights.

    `path` holds one sentence per line, or `source<TAB>sentence` lines. For the shared
    `sentences.norm.txt.xz`, the line-aligned `sentences.tsv.xz` beside it gives each line's
    source, and archaic books are sampled less often.
    """
    if not path.is_file():
        raise SynthError(f"text file not found: {path}")
    lines = list(read_lines(path))
    sources_file = path.with_name("sentences.tsv.xz")
    sources = [""] * len(lines)
    if path.name == "sentences.norm.txt.xz" and sources_file.is_file():
        sources = [line.split("\t", 1)[0] for line in read_lines(sources_file)]
        if len(sources) != len(lines):
            raise SynthError(f"{sources_file} is not line-aligned with {path}")
    seen: set[str] = set()
    texts, weights = [], []
    for source, line in zip(sources, lines, strict=True):
        if "\t" in line:
            source, line = line.split("\t", 1)
        text = normalize(line)
        if not text or len(text.split()) > MAX_WORDS or text in seen or sentence_split(text) != split:
            continue
        seen.add(text)
        texts.append(text)
        weights.append(ARCHAIC_WEIGHT if source.startswith(ARCHAIC_SOURCES) else 1.0)
    if not texts:
        raise SynthError(f"{path}: no usable sentences for split {split!r}")
    return texts, weights


# ---------------------------------------------------------------- planning


def plan_jobs(
    texts: list[str], weights: list[float], voices: list[Voice], hours: float, split: str, seed: int
) -> list[Job]:
    """Decide every utterance (sentence, voice, prosody, file name) from the seed alone.

    The engine is drawn first (ENGINE_SHARE), then a voice of it: espeak-ng has hundreds of
    voices and the others a handful, and a uniform draw over voices would hide the others.
    """
    rng = random.Random(f"{seed}:{split}")
    by_engine: dict[str, list[Voice]] = defaultdict(list)
    for v in voices:
        by_engine[v.engine].append(v)
    engines = sorted(by_engine)
    shares = [ENGINE_SHARE[e] for e in engines]
    chapter = SPLIT_CHAPTER[split] + 10 * seed
    budget = hours * 3600
    counters: dict[int, int] = defaultdict(int)
    jobs = []
    while budget > 0:
        text = rng.choices(texts, weights)[0]
        voice = rng.choice(by_engine[rng.choices(engines, shares)[0]])
        prosody = Prosody(
            rate=round(math.exp(rng.uniform(*(math.log(r) for r in RATE_RANGE))), 3),
            pitch=round(math.exp(rng.uniform(*(math.log(p) for p in PITCH_RANGE))), 3),
            gain_db=round(rng.uniform(-20.0, -1.0), 1),
        )
        n = counters[voice.speaker]
        counters[voice.speaker] += 1
        utt_id = f"{voice.speaker}-{chapter}-{n:04d}"
        path = f"{voice.speaker}/{chapter}/{utt_id}.flac"
        jobs.append(Job(utt_id, path, text, voice, prosody))
        budget -= len(text.split()) / WORDS_PER_SECOND / prosody.rate
    return jobs


# ---------------------------------------------------------------- engines


def _espeak(voice: Voice, text: str, p: Prosody, tmp: Path) -> bytes:
    speed = str(int(np.clip(round(175 * p.rate), 80, 450)))
    pitch = str(int(np.clip(round(50 * p.pitch), 0, 99)))
    return subprocess.run(
        ["espeak-ng", "--stdout", "-v", voice.name, "-s", speed, "-p", pitch, text],
        check=True,
        capture_output=True,
    ).stdout


def _flite(voice: Voice, text: str, p: Prosody, tmp: Path) -> bytes:
    out = tmp / "flite.wav"
    f0 = FLITE_F0.get(voice.name, 110.0) * p.pitch
    cmd = ["flite", "-voice", voice.name, "-t", text, "-o", str(out)]
    cmd += ["--setf", f"duration_stretch={1 / p.rate:.3f}", "--setf", f"int_f0_target_mean={f0:.1f}"]
    subprocess.run(cmd, check=True, capture_output=True)
    return out.read_bytes()


def _festival(voice: Voice, text: str, p: Prosody, tmp: Path) -> bytes:
    out = tmp / "festival.wav"
    cmd = ["text2wave", "-o", str(out), "-eval", f"(voice_{voice.name})"]
    cmd += ["-eval", f"(Parameter.set 'Duration_Stretch {1 / p.rate:.3f})"]
    if voice.name.endswith("_diphone"):  # LR intonation: move the target F0 mean
        params = f"(target_f0_mean {105.0 * p.pitch:.1f}) (target_f0_std 14) (model_f0_mean 170) (model_f0_std 34)"
        cmd += ["-eval", f"(set! int_lr_params '({params}))"]
    subprocess.run(cmd, input=text.encode(), check=True, capture_output=True)
    return out.read_bytes()


SYNTHESIZERS = {"espeak": _espeak, "flite": _flite, "festival": _festival}


def synthesize(job: Job, tmp: Path) -> np.ndarray:
    """Run the engine; return 16 kHz mono float32 at the job's level."""
    wav = SYNTHESIZERS[job.voice.engine](job.voice, job.text.lower(), job.prosody, tmp)
    audio, rate = sf.read(io.BytesIO(wav), dtype="float32", always_2d=True)
    audio = audio.mean(axis=1)
    if rate != SAMPLE_RATE:
        audio = torchaudio.functional.resample(torch.from_numpy(audio), rate, SAMPLE_RATE).numpy()
    peak = float(np.abs(audio).max()) if audio.size else 0.0
    if not np.isfinite(peak) or peak < 1e-4:
        raise SynthError(f"{job.voice.id} produced no audio for {job.text[:40]!r}")
    return (audio * (10 ** (job.prosody.gain_db / 20) / peak)).astype(np.float32)


@dataclass(frozen=True)
class Result:
    job: Job
    duration: float  # 0 when it failed
    error: str = ""


def _work(args: tuple[Job, Path]) -> Result:
    job, root = args
    try:
        with tempfile.TemporaryDirectory() as tmp:
            audio = synthesize(job, Path(tmp))
    except (subprocess.CalledProcessError, SynthError, sf.LibsndfileError) as e:
        return Result(job, 0.0, f"{job.utt_id} ({job.voice.id}): {e}")
    path = root / job.path
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return Result(job, len(audio) / SAMPLE_RATE)


def _init_worker() -> None:
    torch.set_num_threads(1)


# ---------------------------------------------------------------- corpus


@dataclass(frozen=True)
class CorpusReport:
    utterances: int
    hours: float
    failed: list[str]
    voices: int
    held_out: list[str]
    manifest: Path


def _write_transcripts(root: Path, results: list[Result]) -> None:
    """Merge this run's lines into each chapter's trans.txt (sorted, as LibriSpeech has them)."""
    by_chapter: dict[Path, dict[str, str]] = defaultdict(dict)
    for r in results:
        folder = root / Path(r.job.path).parent
        by_chapter[folder][r.job.utt_id] = r.job.text
    for folder, lines in by_chapter.items():
        trans = folder / f"{folder.parent.name}-{folder.name}.trans.txt"
        if trans.is_file():
            for line in trans.read_text().splitlines():
                utt, _, text = line.partition(" ")
                lines.setdefault(utt, text)
        trans.write_text("".join(f"{u} {lines[u]}\n" for u in sorted(lines)))


def _write_manifest(root: Path, split: str, results: list[Result], heldout: bool) -> Path:
    manifest = root / f"{split}{'-heldout' if heldout else ''}.jsonl"
    with manifest.open("w") as f:
        for r in sorted(results, key=lambda r: r.job.utt_id):
            row = {"audio_filepath": r.job.path, "duration": round(r.duration, 3), "text": r.job.text}
            row |= {"speaker": r.job.voice.speaker, "voice": r.job.voice.id, **asdict(r.job.prosody)}
            f.write(json.dumps(row) + "\n")
    return manifest


def build_corpus(
    out: Path,
    hours: float,
    text_path: Path,
    split: str = "train",
    seed: int = 0,
    jobs: int | None = None,
    engines: tuple[str, ...] = ENGINES,
    heldout: bool = False,
    progress: bool = True,
) -> CorpusReport:
    """Synthesize `hours` of `split` into `out` (see the module docstring for the layout)."""
    if split not in SPLITS:
        raise SynthError(f"unknown split {split!r} (choose from {', '.join(SPLITS)})")
    if hours <= 0:
        raise SynthError(f"--hours must be positive, got {hours}")
    if heldout and split != "test":
        raise SynthError("held-out voices are only used by the test split")
    voices = list_voices(engines)
    held = [v for v in voices if v.held_out]
    pool_voices = held if heldout else [v for v in voices if not v.held_out]
    if not pool_voices:
        raise SynthError(f"no {'held-out' if heldout else 'training'} voices among engines {engines}")
    texts, weights = load_sentences(text_path, split)
    plan = plan_jobs(texts, weights, pool_voices, hours, split, seed)
    out.mkdir(parents=True, exist_ok=True)
    workers = jobs or os.cpu_count() or 1
    results: list[Result] = []
    with mp.get_context("fork").Pool(workers, initializer=_init_worker) as pool:
        it = pool.imap(_work, [(j, out) for j in plan], chunksize=4)
        for r in tqdm(it, total=len(plan), desc=f"synth {split}", unit="utt", disable=not progress):
            results.append(r)
    done = [r for r in results if not r.error]
    _write_transcripts(out, done)
    manifest = _write_manifest(out, split, done, heldout)
    return CorpusReport(
        utterances=len(done),
        hours=sum(r.duration for r in done) / 3600,
        failed=[r.error for r in results if r.error],
        voices=len({r.job.voice for r in done}),
        held_out=sorted(v.id for v in held),
        manifest=manifest,
    )


def voice_table(voices: list[Voice]) -> str:
    """Text table for `asr synth --list-voices`."""
    rows = [f"{'speaker':>8}  {'engine':<9} {'voice':<40} held-out"]
    rows += [f"{v.speaker:>8}  {v.engine:<9} {v.name:<40} {'yes' if v.held_out else ''}" for v in voices]
    by_engine = Counter(v.engine for v in voices)
    held = sum(v.held_out for v in voices)
    summary = ", ".join(f"{n} {e}" for e, n in by_engine.items())
    rows.append(f"\n{len(voices)} voices ({summary}); {held} held out for the held-out-voice test split")
    if "espeak" in by_engine:
        accents = {v.name.split("+")[0] for v in voices if v.engine == "espeak"}
        rows.append(f"espeak-ng: {len(accents)} English accents x {by_engine['espeak'] // len(accents)} variants")
    return "\n".join(rows)


def default_text_path() -> Path:
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "text" / "sentences.norm.txt.xz"


def parse_engines(text: str) -> tuple[str, ...]:
    engines = tuple(e.strip() for e in re.split(r"[,\s]+", text) if e.strip())
    unknown = [e for e in engines if e not in ENGINES]
    if unknown or not engines:
        raise SynthError(f"unknown engine(s) {unknown}; choose from {', '.join(ENGINES)}")
    return engines
