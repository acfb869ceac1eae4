"""The `asr` command line: `asr transcribe ...` (run `asr COMMAND --help` for each command)."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from asr import DEFAULT_MODEL_DIR, __version__
from asr.audio import AudioError
from asr.checkpoint import DTYPES, ModelLoadError, load_config, load_model, save_model
from asr.decoding import Segment, SegmenterConfig
from asr.lm import BeamConfig, BeamSearch, LMError, SegmentRescorer, find_lm
from asr.model import ASRModel, ModelDimensions
from asr.writers import FORMATS, format_timestamp, write_outputs

if TYPE_CHECKING:
    from export.onnx import OnnxModel


class CLIError(Exception):
    """A usage problem reported as `asr: error: ...` with exit code 2."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda was asked for, but torch sees no CUDA GPU (use --device cpu)")
    return torch.device(name)


def resolve_model_dir(model: Path | None) -> Path:
    if model is not None:
        return model
    if (DEFAULT_MODEL_DIR / "config.json").is_file():
        return DEFAULT_MODEL_DIR
    raise CLIError(f"no bundled model at {DEFAULT_MODEL_DIR}; pass --model DIR")


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def add_model_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, help=f"model directory (default: the bundled {DEFAULT_MODEL_DIR})")


def add_model_args(p: argparse.ArgumentParser) -> None:
    add_model_dir_arg(p)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to run (default: auto)")
    p.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default="float32",
        help="the weights' and activations' type; the recurrent (SSM) state stays float32 either way. On a GPU "
        "the one-frame kernel that `asr serve` steps live streams with takes about half the time in bfloat16 "
        "(BENCHMARKS.md, session 20); no faster on the CPU. bfloat16 results match float32's within its rounding, "
        "not exactly: on the model card's test sets WER moved by at most 0.2 points (models/default/README.md), "
        "and streamed and offline results can differ slightly. Default: float32",
    )


def add_lm_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "language model",
        "Finished segments are decoded again by a lexicon beam search with a word n-gram LM: by default the "
        "model's bundled lm/ (see `asr lm`), greedy decoding if it has none. Partial results stay greedy.",
    )
    g.add_argument("--lm", type=Path, metavar="DIR", help="language model directory (default: MODEL/lm if present)")
    g.add_argument("--no-lm", action="store_true", help="greedy decoding only")
    g.add_argument("--beam-size", type=_positive_int, help="hypotheses kept per frame (default: from DIR/decoder.json)")
    g.add_argument("--lm-weight", type=float, help="LM weight (default: from DIR/decoder.json)")
    g.add_argument("--word-score", type=float, help="score added per word (default: from DIR/decoder.json)")


def resolve_lm(args: argparse.Namespace, model_dir: Path) -> BeamSearch | None:
    """The beam search the LM arguments ask for, or None for greedy decoding."""
    overrides = {"beam_size": args.beam_size, "lm_weight": args.lm_weight, "word_score": args.word_score}
    if args.no_lm:
        if args.lm is not None:
            raise CLIError("--lm and --no-lm exclude each other")
        given = [f"--{k.replace('_', '-')}" for k, v in overrides.items() if v is not None]
        if given:
            raise CLIError(f"{', '.join(given)} set the LM beam search, which --no-lm turns off")
        return None
    lm_dir = args.lm if args.lm is not None else find_lm(model_dir)
    if lm_dir is None:
        return None
    try:
        config = BeamConfig.of(lm_dir)
        config = replace(config, **{k: v for k, v in overrides.items() if v is not None})
        return BeamSearch(lm_dir, config)
    except (LMError, ValueError) as e:
        raise CLIError(str(e)) from e


def add_client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="ws://127.0.0.1:8765", help="server (default: ws://127.0.0.1:8765)")
    p.add_argument("--token", help="auth token")


def _add_transcribe(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "transcribe",
        help="transcribe audio files to txt/srt/vtt/json",
        description="Transcribe audio files through the streaming path (memory stays flat for hours of "
        "audio). Reads WAV, FLAC, OGG/Opus, MP3 and anything else libsndfile reads, at any sample rate "
        "and channel count. Output files are named after each input: talk.flac -> talk.srt.",
    )
    p.add_argument("files", nargs="+", type=Path, metavar="FILE", help="audio files")
    add_model_args(p)
    p.add_argument(
        "--onnx",
        type=Path,
        metavar="FILE",
        help="run this exported model (`asr export`) with onnxruntime instead of --model: onnxruntime's CUDA "
        "provider where --device is (or auto finds) cuda, else its CPU provider; its LM is --lm, else an lm/ folder "
        "beside FILE",
    )
    p.add_argument("-f", "--format", choices=(*FORMATS, "all"), default="all", help="output format (default: all)")
    p.add_argument("-o", "--output-dir", type=Path, default=Path("."), help="where to write (default: .)")
    p.add_argument(
        "--chunk-ms", type=_positive_int, default=1000, help="audio per streaming step in ms (default: 1000)"
    )
    p.add_argument(
        "--pause", type=_positive_float, default=0.8, help="a pause this long (s) ends a caption segment (default: 0.8)"
    )
    p.add_argument(
        "--max-segment", type=_positive_float, default=10.0, help="longest caption segment in seconds (default: 10)"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no segments on stdout")
    add_lm_args(p)
    p.set_defaults(func=cmd_transcribe)


def cmd_transcribe(args: argparse.Namespace) -> int:
    from asr.transcribe import transcribe_file

    device = resolve_device(args.device)
    if args.onnx is not None:
        model = _load_onnx(args, device)
        config, model_dir, device = model.config, args.onnx.parent, torch.device("cpu")  # torch: features, decoding
    else:
        model_dir = resolve_model_dir(args.model)
        model, config = load_model(model_dir, device=device, dtype=DTYPES[args.dtype])
    search = resolve_lm(args, model_dir)
    formats = FORMATS if args.format == "all" else (args.format,)
    segmenter = SegmenterConfig(pause_s=args.pause, max_segment_s=args.max_segment)

    def show(segment: Segment) -> None:
        start, end = format_timestamp(segment.start, "."), format_timestamp(segment.end, ".")
        tqdm.write(f"[{start} --> {end}] {segment.text}")

    failed = 0
    for path in args.files:
        try:
            transcript = transcribe_file(
                path,
                model,
                config.vocab,
                device,
                args.chunk_ms,
                segmenter,
                progress=not args.quiet,
                on_segment=None if args.quiet else show,
                rescorer=SegmentRescorer(search) if search else None,
            )
        except AudioError as e:
            print(f"asr: error: {e}", file=sys.stderr)
            failed += 1
            continue
        written = write_outputs(transcript, path, args.output_dir, formats)
        if not args.quiet:
            print(f"{path}: wrote {', '.join(str(w) for w in written)}", file=sys.stderr)
    if failed:
        print(f"asr: {failed} of {len(args.files)} files failed", file=sys.stderr)
    return 1 if failed else 0


def _load_onnx(args: argparse.Namespace, device: torch.device) -> OnnxModel:
    """`--onnx FILE`'s runner: onnxruntime's CUDA provider for a cuda `device`, else its CPU provider."""
    from export.onnx import OnnxModel

    if args.model is not None:
        raise CLIError("--onnx runs an exported file instead of --model: give one of them")
    if args.dtype != "float32":
        raise CLIError(f"--onnx runs the exported float32 graph; --dtype {args.dtype} does not apply")
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.type == "cuda" else None
    return OnnxModel(args.onnx, providers)


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a model's streaming step to ONNX (onnxruntime, sherpa-onnx-style runtimes)",
        description="Write a model's streaming step as one ONNX graph: raw log-mel of B streams (any B) and L "
        "encoder frames (any L >= 1) plus the streaming state in, logits and the next state out (docs/onnx.md). The "
        "model's config (dimensions, features, CMVN, vocabulary) goes into the file's metadata. After writing, it "
        "streams random features through the file in chunks of 1, 3 and 8 frames and compares the logits with "
        "the PyTorch model's offline forward (exit 1 past --tolerance; the file is kept for inspection). "
        "`asr transcribe --onnx FILE` runs it.",
    )
    p.add_argument("out", type=Path, help="ONNX file to write, such as model.onnx")
    add_model_dir_arg(p)
    p.add_argument(
        "--tolerance",
        type=_positive_float,
        default=1e-3,
        help="largest logit difference the check accepts (default: %(default)s)",
    )
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from export.onnx import OnnxModel, export_onnx, stream_difference

    if args.out.is_dir() or not args.out.parent.is_dir():
        raise CLIError(f"{args.out}: give a file name in an existing directory, such as model.onnx")
    model, config = load_model(resolve_model_dir(args.model))
    print(f"exporting {model.num_parameters():,} parameters to {args.out} (about a minute for the bundled model)")
    export_onnx(model, config, args.out)
    difference = stream_difference(model, OnnxModel(args.out), chunks=(1, 3, 8))
    size = args.out.stat().st_size / 1e6
    print(f"wrote {args.out} ({size:.1f} MB); streamed vs offline logits: max |difference| {difference:.2e}")
    if difference > args.tolerance:
        print(
            f"asr: error: the exported graph differs by more than {args.tolerance} (kept for inspection)",
            file=sys.stderr,
        )
        return 1
    return 0


def _add_init_model(sub: argparse._SubParsersAction) -> None:
    defaults = ModelDimensions()
    p = sub.add_parser(
        "init-model",
        help="write an untrained, randomly initialised model directory",
        description="Write a randomly initialised model directory (model.safetensors + config.json). "
        "Its output is noise: it is for testing pipelines and for speed benchmarks.",
    )
    p.add_argument("dir", type=Path, help="model directory to create")
    p.add_argument("--d-model", type=_positive_int, default=defaults.d_model, help="width (default: %(default)s)")
    p.add_argument(
        "--layers", type=_positive_int, default=defaults.n_layers, help="Mamba blocks (default: %(default)s)"
    )
    p.add_argument(
        "--d-state", type=_positive_int, default=defaults.d_state, help="SSM state size (default: %(default)s)"
    )
    p.add_argument(
        "--head-dim", type=_positive_int, default=defaults.head_dim, help="SSM head size (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.set_defaults(func=cmd_init_model)


def cmd_init_model(args: argparse.Namespace) -> int:
    try:
        dims = ModelDimensions(d_model=args.d_model, n_layers=args.layers, d_state=args.d_state, head_dim=args.head_dim)
    except ValueError as e:
        raise CLIError(str(e)) from e
    torch.manual_seed(args.seed)
    model = ASRModel(dims)
    save_model(model, args.dir, info={"untrained": True, "seed": args.seed})
    print(f"wrote untrained model ({model.num_parameters():,} parameters) to {args.dir}")
    return 0


_WEIGHT_FORMATS = {"float32": torch.float32, "float16": torch.float16, "int8": torch.float16}


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="rewrite a model directory's weights as float32, float16 or int8",
        description="Copy a model directory (a training checkpoint or a released model) with its weights stored "
        "as float32, float16 (half the size) or int8 (the large matrices as int8 with one float32 scale per "
        "output row, the rest float16: about a quarter of float32). Any stored format is loaded as float32 "
        "(then cast to `--dtype` by the commands that take it). A lm/ folder next to the weights is copied too.",
    )
    p.add_argument("model", type=Path, help="model directory to read")
    p.add_argument("out", type=Path, help="model directory to write (must not be the input)")
    p.add_argument(
        "--weights", choices=sorted(_WEIGHT_FORMATS), default="float16", help="storage format (default: %(default)s)"
    )
    p.set_defaults(func=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    if args.out.resolve() == args.model.resolve():
        raise CLIError("convert writes a new directory: OUT must differ from MODEL")
    model, config = load_model(args.model)
    save_model(model, args.out, info=config.info, dtype=_WEIGHT_FORMATS[args.weights], int8=args.weights == "int8")
    lm = args.model / "lm"
    if lm.is_dir():
        shutil.copytree(lm, args.out / "lm", dirs_exist_ok=True)
    size = sum(f.stat().st_size for f in args.out.iterdir() if f.is_file())
    print(f"wrote {args.out} ({args.weights} weights, {size / 1e6:.1f} MB{', with lm/' if lm.is_dir() else ''})")
    return 0


def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="synthesize a LibriSpeech-layout corpus with every English TTS voice",
        description="Synthesize speech from sentences with espeak-ng (accents x variants), flite and festival, "
        "drawing a speaking rate, pitch and volume per utterance. Writes 16 kHz FLAC in the LibriSpeech "
        "layout (speaker/chapter/speaker-chapter-NNNN.flac + .trans.txt) and a JSONL manifest "
        "(OUT/<split>.jsonl). Splits never share a sentence; the same seed gives the same corpus.",
    )
    p.add_argument("--out", type=Path, help="corpus root to write into")
    p.add_argument("--hours", type=_positive_float, help="hours of speech to make (planned from word counts)")
    p.add_argument(
        "--text",
        type=Path,
        help="sentences, one per line or source<TAB>sentence, .xz ok "
        "(default: ../shared/data/text/sentences.norm.txt.xz)",
    )
    p.add_argument("--split", choices=("train", "dev", "test"), default="train", help="default: train")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--jobs", type=_positive_int, help="parallel processes (default: all cores)")
    p.add_argument("--engines", default="espeak,flite,festival", help="comma-separated (default: all three)")
    p.add_argument("--holdout-voices", action="store_true", help="test split from the held-out voices only")
    p.add_argument("--list-voices", action="store_true", help="print the voice inventory and exit")
    p.set_defaults(func=cmd_synth)


def cmd_synth(args: argparse.Namespace) -> int:
    from asr import synth

    try:
        engines = synth.parse_engines(args.engines)
        if args.list_voices:
            print(synth.voice_table(synth.list_voices(engines)))
            return 0
        if args.out is None or args.hours is None:
            raise CLIError("asr synth needs --out DIR and --hours H (or --list-voices)")
        report = synth.build_corpus(
            args.out,
            args.hours,
            args.text or synth.default_text_path(),
            split=args.split,
            seed=args.seed,
            jobs=args.jobs,
            engines=engines,
            heldout=args.holdout_voices,
        )
    except synth.SynthError as e:
        raise CLIError(str(e)) from e
    if args.holdout_voices or args.split == "test":
        print(f"held-out voices ({len(report.held_out)}): {', '.join(report.held_out)}")
    for error in report.failed:
        print(f"asr synth: failed: {error}", file=sys.stderr)
    print(
        f"{report.utterances} utterances, {report.hours:.2f} h, {report.voices} voices -> {args.out} "
        f"(manifest {report.manifest}); {len(report.failed)} failed"
    )
    return 1 if report.failed and not report.utterances else 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="word error rate of a model on a data set",
        description="Decode a data set and score it with jiwer: WER, CER, substitutions, deletions, insertions, "
        "utterances, hours and RTFx. PATH is a LibriSpeech root (e.g. LibriSpeech/test-clean), a JSONL "
        "manifest or a transcripts.tsv. The last line is `WER <x.xx>% on <n> utterances (<h.hh> h)`.",
    )
    p.add_argument("--data", type=Path, required=True, metavar="PATH", help="data to evaluate on")
    add_model_args(p)
    p.add_argument("--mode", choices=("offline", "streaming"), default="offline", help="default: offline")
    p.add_argument("--chunk-ms", type=_positive_int, default=1000, help="streaming chunk in ms (default: 1000)")
    p.add_argument("--limit", type=_positive_int, help="only the first N utterances")
    p.add_argument("--json", type=Path, metavar="OUT", help="write the summary as JSON")
    p.add_argument("--errors", type=Path, metavar="OUT", help="write per-utterance alignments, worst first")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_lm_args(p)
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from asr.data import DataError, read_source
    from asr.evaluate import evaluate, write_errors

    device = resolve_device(args.device)
    model_dir = resolve_model_dir(args.model)
    model, config = load_model(model_dir, device=device, dtype=DTYPES[args.dtype])
    search = resolve_lm(args, model_dir)
    try:
        source = read_source(args.data)
    except DataError as e:
        raise CLIError(str(e)) from e
    for line in source.skipped:
        print(f"asr eval: skipped: {line}", file=sys.stderr)
    utts = source.utterances[: args.limit] if args.limit else source.utterances
    if not utts:
        raise CLIError(f"{args.data}: no utterances to evaluate")

    def report(message: str) -> None:
        tqdm.write(f"asr eval: unreadable, skipped: {message}", file=sys.stderr)

    summary, results = evaluate(
        model,
        utts,
        args.mode,
        device,
        args.chunk_ms,
        config.vocab,
        progress=not args.quiet,
        on_error=report,
        search=search,
    )
    if args.errors:
        write_errors(results, args.errors)
    if args.json:
        args.json.write_text(json.dumps(summary.to_json(), indent=2) + "\n")
    print(summary.report(str(args.data), skipped=len(source.skipped)))
    return 0


def _add_lm(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "lm",
        help="build a word n-gram language model for beam search",
        description="Build OUT (a model's lm/ directory: lm.bin, lexicon.txt, decoder.json) from text with KenLM's "
        "lmplz and build_binary (scripts/build_kenlm.sh builds them; `make setup` does it). Lines are "
        "normalized like training targets; `source<TAB>sentence` lines are read as the sentence. The lexicon "
        "is every word of the text and of the --words lists: the beam search writes no other word.",
    )
    p.add_argument("--text", type=Path, nargs="+", required=True, metavar="FILE", help="text files (.xz ok)")
    p.add_argument(
        "--words",
        type=Path,
        nargs="+",
        default=[],
        metavar="FILE",
        help="word lists, one word a line (.xz ok), e.g. /usr/share/dict/american-english (Debian's wamerican): "
        "each word the text lacks joins the lexicon, with the LM probability of a word seen once",
    )
    p.add_argument("--out", type=Path, required=True, help="directory to write, e.g. models/default/lm")
    p.add_argument("--order", type=_positive_int, default=4, help="n-gram order (default: 4)")
    p.add_argument(
        "--prune",
        type=int,
        nargs="+",
        default=[0, 0, 1, 1],
        metavar="N",
        help="lmplz count thresholds per order, 0 keeps all (default: 0 0 1 1)",
    )
    p.add_argument(
        "--split",
        choices=("all", "train"),
        default="all",
        help="train: only sentences of `asr synth`'s training split, so that no synthetic dev or test "
        "sentence is in the LM (the bundled model's LM; default: all)",
    )
    p.add_argument("--kenlm-bin", type=Path, help="folder holding lmplz and build_binary (default: PATH)")
    p.add_argument("--lm-weight", type=float, default=BeamConfig.lm_weight, help="written to decoder.json")
    p.add_argument("--word-score", type=float, default=BeamConfig.word_score, help="written to decoder.json")
    p.add_argument("--beam-size", type=_positive_int, default=BeamConfig.beam_size, help="written to decoder.json")
    p.set_defaults(func=cmd_lm)


def cmd_lm(args: argparse.Namespace) -> int:
    from asr.lm import build_lm, lm_sentences, word_list
    from asr.synth import sentence_split

    keep = (lambda text: sentence_split(text) == "train") if args.split == "train" else None
    config = BeamConfig(beam_size=args.beam_size, lm_weight=args.lm_weight, word_score=args.word_score)
    try:
        words = word_list(args.words)
        sentences = lm_sentences(args.text, keep)
        summary = build_lm(sentences, args.out, args.order, tuple(args.prune), config, args.kenlm_bin, words)
    except LMError as e:
        raise CLIError(str(e)) from e
    print(
        f"{args.out}: {summary.order}-gram LM from {summary.sentences} sentences ({summary.words} words), "
        f"lexicon {summary.lexicon} words ({summary.added_words} from word lists), "
        f"lm.bin {summary.size_bytes / 1e6:.1f} MB"
    )
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    from training.cli import DESCRIPTION, add_arguments

    p = sub.add_parser("train", help="train a model from a TOML config", description=DESCRIPTION)
    add_arguments(p)
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from training.cli import run

    return run(args)


def _add_plot(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plot", help="draw a training run's curves to a PNG", description="Plot RUN_DIR/metrics.csv to a PNG."
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    p.add_argument("-o", "--out", type=Path, help="PNG to write (default: RUN_DIR/curves.png)")
    p.set_defaults(func=cmd_plot)


def cmd_plot(args: argparse.Namespace) -> int:
    from training.plot import plot_run

    if not (args.run_dir / "metrics.csv").is_file():
        raise CLIError(f"{args.run_dir}: no metrics.csv (is it a training run folder?)")
    try:
        print(plot_run(args.run_dir, args.out))
    except ValueError as e:
        raise CLIError(str(e)) from e
    return 0


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="WebSocket streaming server (native protocol at /v1/stream, Vosk protocol at /vosk)",
        description="Serve live transcription over WebSockets. Protocol: docs/protocol.md. Health at /healthz, "
        "Prometheus metrics at /metrics. SIGTERM drains: stop accepting, send every open stream its finals, exit 0.",
    )
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8765, help="port (default: 8765; 0 picks a free one)")
    p.add_argument("--max-streams", type=_positive_int, default=64, help="state slots; more get HTTP 503 (default 64)")
    p.add_argument("--token", help="require this token (Authorization: Bearer T, or ?token=T)")
    p.add_argument("--tls-cert", type=Path, help="TLS certificate (PEM); with --tls-key serves wss://")
    p.add_argument("--tls-key", type=Path, help="TLS private key (PEM)")
    p.add_argument("--allowed-origin", action="append", default=[], metavar="O", help="browser Origin to allow")
    p.add_argument("--idle-timeout", type=_positive_float, default=30.0, help="seconds without a message (30)")
    p.add_argument("--resume-ttl", type=_positive_float, default=30.0, help="seconds a dropped stream is kept (30)")
    p.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        help="server processes sharing the port and the device, each with 1/N of the slots: one Python "
        "process feeds a GPU at most a few hundred streams (default 1)",
    )
    p.add_argument(
        "--step-process",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with --workers: one more process holds the model and every worker's stream state and runs the "
        "model steps of all workers batched together, instead of each worker stepping its own streams "
        "(default: on with --workers 2 or more on a GPU, off otherwise)",
    )
    p.add_argument(
        "--lm-processes",
        type=_non_negative_int,
        default=2,
        metavar="N",
        help="with a language model: processes (per worker) that decode finals again, so that the batcher "
        "never waits for the beam search; 0 runs it in the batcher thread (default 2)",
    )
    add_lm_args(p)
    p.set_defaults(func=cmd_serve)


def build_server(args: argparse.Namespace, plan=None):
    """The `ASRServer` that `asr serve` runs, or worker `plan.index` of `--workers` (streaming.workers)."""
    from streaming.server import ASRServer, ServerConfig

    device = resolve_device(args.device)
    model_dir = resolve_model_dir(args.model)
    compute = None if plan is None else plan.compute
    where = device if compute is None else "cpu"  # the step process has the GPU
    model, _ = load_model(model_dir, device=where, dtype=DTYPES[args.dtype])
    search = resolve_lm(args, model_dir)
    server_config = ServerConfig(
        host=args.host,
        port=args.port if plan is None else plan.port,
        max_streams=args.max_streams if plan is None else plan.max_streams,
        token=args.token,
        allowed_origins=tuple(args.allowed_origin),
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        idle_timeout_s=args.idle_timeout,
        resume_ttl_s=args.resume_ttl,
        worker=0 if plan is None else plan.index,
        workers=1 if plan is None else plan.count,
        relay_dir=None if plan is None else plan.relay_dir,
        lm_processes=args.lm_processes,
    )
    info = {
        "dims": model.dims.to_dict(),
        "parameters": model.num_parameters(),
        "device": str(device),
        "dtype": args.dtype,
        "decoder": "greedy" if search is None else "lm",
    }
    return ASRServer(model, device, server_config, info, search, compute)


def uses_step_process(args: argparse.Namespace, device: torch.device) -> bool:
    """`--step-process` as given, else on for several workers on a GPU: there it batches every worker's steps
    into one (BENCHMARKS.md), while on the CPU each worker stepping its own streams on its own core is faster."""
    if args.step_process is None:
        return args.workers > 1 and device.type == "cuda"
    return args.step_process


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    if (args.tls_cert is None) != (args.tls_key is None):
        raise CLIError("--tls-cert and --tls-key go together")
    if args.workers > args.max_streams:
        raise CLIError(f"--workers {args.workers} is more than --max-streams {args.max_streams}")
    if args.step_process and args.workers < 2:
        raise CLIError("--step-process goes with --workers 2 or more")
    scheme = "wss" if args.tls_cert else "ws"

    def ready(port: int) -> None:
        workers = f", {args.workers} workers" if args.workers > 1 else ""
        print(f"listening on {scheme}://{args.host}:{port}/v1/stream (Vosk: /vosk{workers})", flush=True)

    if args.workers == 1:
        server = build_server(args)
        asyncio.run(server.run_until_signal(lambda s: ready(s.port)))
        print("drained, bye", flush=True)
        return 0
    from streaming.workers import WorkerError, run_workers

    model_dir = resolve_model_dir(args.model)  # usage errors here, before any worker starts
    step, device = None, resolve_device(args.device)
    if uses_step_process(args, device):
        from streaming.compute import StepSpec

        step = StepSpec(model_dir, str(device), load_config(model_dir).dims.vocab_size, DTYPES[args.dtype])
    try:
        code = run_workers(build_server, args, args.workers, ready, step)
    except WorkerError as e:
        raise CLIError(str(e)) from e
    print("drained, bye" if code == 0 else "a server process died; the workers were stopped", flush=True)
    return code


def _add_stream(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "stream",
        help="stream an audio file to a server and show live captions",
        description="Stream FILE (any format; sent as 16 kHz pcm_s16le) to an `asr serve` server. Partials "
        "overwrite one line; finals are printed with their times.",
    )
    p.add_argument("file", type=Path, metavar="FILE")
    add_client_args(p)
    pace = p.add_mutually_exclusive_group()
    pace.add_argument("--realtime", action="store_true", help="send at the speed of speech, like a microphone")
    pace.add_argument("--fast", action="store_true", help="send as fast as the server takes it (default)")
    p.set_defaults(func=cmd_stream)


def cmd_stream(args: argparse.Namespace) -> int:
    from websockets.exceptions import InvalidStatus, WebSocketException

    from clients.stream import main as stream_main

    try:
        return stream_main(args.url, args.file, args.realtime, args.token)
    except AudioError as e:
        raise CLIError(str(e)) from e
    except InvalidStatus as e:
        raise CLIError(
            f"server refused the connection: HTTP {e.response.status_code} {e.response.body.decode().strip()}"
        ) from e
    except (OSError, WebSocketException) as e:
        raise CLIError(f"cannot stream to {args.url}: {e}") from e


def _add_mic(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "mic",
        help="live captions from the microphone",
        description="Capture the default microphone (16 kHz mono, via sounddevice/PortAudio) and stream it to an "
        "`asr serve` server; partials overwrite one line, finals get their own. Ctrl-C stops.",
    )
    add_client_args(p)
    p.set_defaults(func=cmd_mic)


def cmd_mic(args: argparse.Namespace) -> int:
    from websockets.exceptions import WebSocketException

    from clients.mic import MicrophoneError
    from clients.mic import main as mic_main

    try:
        return mic_main(args.url, args.token)
    except MicrophoneError as e:
        raise CLIError(str(e)) from e
    except (OSError, WebSocketException) as e:
        raise CLIError(f"cannot stream to {args.url}: {e}") from e


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asr", description="Streaming speech recognition (causal Mamba + CTC).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_transcribe(sub)
    _add_init_model(sub)
    _add_convert(sub)
    _add_export(sub)
    _add_synth(sub)
    _add_eval(sub)
    _add_lm(sub)
    _add_train(sub)
    _add_plot(sub)
    _add_serve(sub)
    _add_stream(sub)
    _add_mic(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CLIError, ModelLoadError) as e:
        print(f"asr: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("asr: interrupted", file=sys.stderr)
        return 130
