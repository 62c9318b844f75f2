"""The `python -m featurize` command line: argparse subcommands `embed` (the default:
`python -m featurize DIR` is `python -m featurize embed DIR`), `verify`, `compact`, `export`
and `map` (featurize._subcommands). A first argument that names a subcommand is that
subcommand; to embed a folder named like one, give it as a path (`./map`) or after `embed`.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
import threading
import warnings
from contextlib import contextmanager

from featurize import cache
from featurize.errors import ArgumentParser, UserError, run_command
from featurize.models.registry import BACKBONES


def _default(options, name: str):
    """The default of an option, as its dataclass field says: written once, there."""
    from dataclasses import fields
    return next(f for f in fields(options) if f.name == name).default


EMBED_HELP = ("Embed every image of a folder once with a frozen backbone and cache the "
              "embeddings to HDF5. Re-running embeds only new or changed files.")


def _parser() -> ArgumentParser:
    """The whole command line: one subparser per command."""
    from featurize._subcommands import COMMANDS
    p = ArgumentParser(prog="python -m featurize", description=EMBED_HELP,
                       epilog="python -m featurize DIR is python -m featurize embed DIR. "
                              "Other commands: python -m featurize verify CACHE [--sample K] "
                              "(check a cache), compact CACHE (merge small shards), export "
                              "CACHE OUT --format parquet|npy (for vector search), map CACHE "
                              "(a 2-D map of the embeddings); each has --help.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    _embed_arguments(sub.add_parser("embed", help="embed a folder of images (the default)",
                                    description=EMBED_HELP))
    for name, command in COMMANDS.items():
        command.arguments(sub.add_parser(name, help=command.help,
                                         description=command.description,
                                         epilog=command.epilog))
    return p


def parse(argv: list[str]):
    """The parsed command line; without a command name first, the command is `embed`."""
    from featurize._subcommands import COMMANDS
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("embed", "-h", "--help")):
        argv = ["embed", *argv]
    return _parser().parse_args(argv)


def _embed_arguments(p: ArgumentParser) -> None:
    from featurize.jobs.run import RunOptions as R
    from featurize.models.align import ALIGNS
    from featurize.models.config import EmbedderConfig as E
    from featurize.runtimes import RUNTIMES
    from featurize.settings import POOLS, PRECISIONS, RESIZES, TTA_PRESETS
    p.add_argument("source", nargs="?", help="folder of class folders, flat folder, or list file")
    p.add_argument("--backbone", default=_default(E, "backbone"), help="default: %(default)s")
    p.add_argument("--weights", default=_default(E, "weights"),
                   help="'default' (published weights, downloaded once), 'none' (random, seeded) "
                        "or a weight file path")
    p.add_argument("--layer", help="embed this layer's output instead of the last conv block")
    p.add_argument("--pool", choices=POOLS, help="global pooling of a conv layer "
                   "(default: the backbone's, avg)")
    p.add_argument("--input-size", type=int, help="square input side (default: the backbone's)")
    p.add_argument("--crop", type=float, help="centre-crop this fraction before resizing")
    p.add_argument("--flip", action="store_true", help="average with the mirrored image")
    p.add_argument("--precision", choices=PRECISIONS, default=_default(E, "precision"),
                   help="float32 (default); mixed (bfloat16, for GPUs); int8 (CPU: the model "
                        "quantised on ONNX Runtime, calibrated on 96 of the dataset's images, "
                        "its own cache; prints its agreement with float32)")
    p.add_argument("--runtime", choices=RUNTIMES, default=_default(R, "runtime"),
                   help="what runs the model: keras, onnx (ONNX Runtime) or openvino, the "
                        "last two from a copy exported once (same embeddings; pip install "
                        "'featurize-embeddings[openvino]' or [onnx]); default: keras on a GPU, "
                        "else openvino, else onnx, whichever is installed")
    p.add_argument("--jitter", type=int, default=_default(E, "jitter"),
                   help="dlib-resnet: average the chip's descriptor with those of N jittered "
                        "copies (seeded per image: the same embedding on every run); N+1 "
                        "network passes per face")
    p.add_argument("--tta", choices=tuple(TTA_PRESETS), default=_default(E, "tta"),
                   help="dlib-resnet: 'fast' (the default, no jitter) or 'accurate' (--jitter "
                        f"{TTA_PRESETS['accurate']}, the cheapest jitter as accurate on LFW as "
                        f"the best measured: {TTA_PRESETS['accurate'] + 1} network passes per "
                        "face; its own cache)")
    p.add_argument("--align", choices=ALIGNS, default=_default(E, "align"),
                   help="face models: 'dlib' finds the face (dlib's HOG detector, 5 landmarks) "
                        "and cuts the crop the backbone was trained on (its preset: see "
                        "--list-backbones); 'none' (the default) uses images as they are. Needs "
                        "pip install -e '.[dlib]'")
    p.add_argument("--resize", choices=RESIZES, default=_default(E, "resize"),
                   help="where to crop and resize: cpu (Pillow) or device (in the model, on the "
                        "GPU; from the first image's size: for folders of one image size)")
    _run_arguments(p)


def _run_arguments(p: ArgumentParser) -> None:
    """How a run goes (RunOptions and the command line's own flags), not what it computes."""
    from featurize.jobs.run import ENGINES, RunOptions as R
    p.add_argument("--batch-size", type=int, help="default: 256 on a GPU, 32 on a CPU")
    p.add_argument("--workers", type=int, help="decoding workers (default: CPU count)")
    p.add_argument("--out", help="cache file (default: derived from dataset and settings)")
    p.add_argument("--cache-dir", default=str(_default(R, "cache_dir")),
                   help="default: %(default)s")
    p.add_argument("--checkpoint-rows", type=int, default=_default(R, "flush_rows"),
                   help="journal progress every N images (or 30 s): the most a kill can lose")
    p.add_argument("--check", choices=cache.CHECKS, default=_default(R, "check"),
                   help="what tells a file changed since it was embedded: size + mtime (the "
                        "default) or also a hash of its content (reads each cached file once "
                        "per run)")
    p.add_argument("--engine", choices=ENGINES, default=_default(R, "engine"),
                   help="local (this process and its decoding workers) or ray (Ray Data: CPU "
                        "decoding tasks, an actor pool of embedders; pip install "
                        "'featurize-embeddings[ray]')")
    p.add_argument("--address", help="--engine ray: the Ray cluster to join (default: start a "
                                     "local one)")
    p.add_argument("--gpus-per-worker", type=float, default=_default(R, "gpus_per_worker"),
                   help="--engine ray: GPUs per embedding actor (default %(default)s: CPU actors)")
    p.add_argument("--strict", action="store_true", help="exit 1 if any image failed")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--list-backbones", action="store_true", help="list backbones and exit")
    p.add_argument("--doctor", action="store_true",
                   help="print the backend, devices, runtime, precision, batch size and "
                        "workers a run with these options would use here, and why; embeds "
                        "nothing")


def list_backbones() -> str:
    rows = [f"{'name':<20} {'input':>5} {'dim':>5}  {'align':<6} weights"]
    for spec in BACKBONES.values():
        rows.append(f"{spec.name:<20} {spec.input_size:>5} {spec.embedding_dim:>5}  "
                    f"{spec.align:<6} {spec.weights_source}")
    rows.append("align: the --align preset recommended (dlib-resnet aligns its chip itself)")
    return "\n".join(rows)


def faces_line(counts: dict) -> str:
    """How this run's faces were found, e.g. "faces: 998 hog, 2 fixed-box (no face found:
    the fixed central box was used)"."""
    from featurize.models.align import FACE_CODES, FACE_FIXED_BOX
    parts = [f"{n} {FACE_CODES.get(code, 'unknown')}" for code, n in sorted(counts.items())]
    line = "faces: " + ", ".join(parts)
    if counts.get(FACE_FIXED_BOX):
        line += " (no face found: the fixed central box was used)"
    return line


def main(argv=None) -> int:
    with command_line():
        return run_command(_main, list(sys.argv[1:] if argv is None else argv))


@contextmanager
def command_line():
    """What only a command line may do to its process: SIGTERM ends a run like Ctrl-C (the
    work done so far is committed first), TensorFlow's start-up log lines are kept out of
    the output, and Python warnings are one line each. Both CLIs run inside it; the Python
    API never does."""
    quiet = _QuietTensorFlowImport()
    sys.meta_path.insert(0, quiet)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning  # catch_warnings restores it
            yield
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        if quiet in sys.meta_path:
            sys.meta_path.remove(quiet)


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {' '.join(str(message).split())}", file=file or sys.stderr)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


class _QuietTensorFlowImport:
    """Importing TensorFlow prints C++ log lines (oneDNN, CPU features) that no environment
    variable silences in TF 2.21; they would land in the middle of progress bars. While
    `tensorflow` itself is imported, file descriptor 2 points at /dev/null. Python errors of
    the import still propagate as exceptions."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            with _stderr_silenced():
                run(module)
        spec.loader.exec_module = exec_module
        return spec


@contextmanager
def _stderr_silenced():
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _main(argv) -> int:
    try:
        args = parse(argv)
    except UserError as e:
        raise UserError(f"{e}{_named_like_a_command(argv)}") from None
    if args.command != "embed":
        from featurize._subcommands import COMMANDS
        return COMMANDS[args.command].run(args)
    if args.list_backbones:
        print(list_backbones())
        return 0
    if args.doctor:
        from featurize.jobs.doctor import report
        print(report(options_from(args)))
        return 0
    if not args.source:
        raise UserError("give a folder of images (or --list-backbones, or a command: verify, "
                        "compact, export, map); see python -m featurize --help.")
    return _featurize(args)


def _named_like_a_command(argv) -> str:
    """A hint when the first argument is a command's name and also a folder here."""
    if argv and argv[0] != "embed" and os.path.isdir(argv[0]) and not argv[0].endswith("/"):
        return (f" (to embed the folder {argv[0]!r}, write python -m featurize ./{argv[0]} or "
                f"python -m featurize embed {argv[0]})")
    return ""


def options_from(args):
    """The FeaturizeOptions the command line's arguments give (checked when made)."""
    from featurize.jobs.run import FeaturizeOptions, RunOptions
    from featurize.models.config import EmbedderConfig
    embedding = EmbedderConfig(
        backbone=args.backbone, weights=args.weights, layer=args.layer, pool=args.pool,
        input_size=args.input_size, crop=args.crop, flip=args.flip, precision=args.precision,
        jitter=args.jitter, resize=args.resize, align=args.align, tta=args.tta)
    run = RunOptions(batch_size=args.batch_size, workers=args.workers,
                     flush_rows=args.checkpoint_rows, check=args.check,
                     progress=not args.quiet, out=args.out, cache_dir=args.cache_dir,
                     engine=args.engine, address=args.address,
                     gpus_per_worker=args.gpus_per_worker, runtime=args.runtime)
    return FeaturizeOptions(embedding, run)


def _featurize(args) -> int:
    from featurize.jobs.run import featurize
    from featurize.models.config import jitter_cost_line
    options = options_from(args)
    if cost := jitter_cost_line(options.embedding):
        print(cost, flush=True)  # before the run: what --jitter/--tta will cost
    s = featurize(args.source, options)
    for note in s.notes:
        print(f"warning: {note}", file=sys.stderr)
    for key, reason in list(s.failed.items())[:10]:
        print(f"warning: {key}: {reason}", file=sys.stderr)
    if len(s.failed) > 10:
        print(f"warning: ... and {len(s.failed) - 10} more failed images", file=sys.stderr)
    if "face" in s.row_info:
        print(faces_line(s.row_info["face"]))
    state = "interrupted, progress saved; run again to resume" if s.interrupted else "done"
    print(f"{state}: {s.total} images, {s.embedded} embedded, {s.reused} already cached, "
          f"{s.failed_total} failed ({s.seconds:.1f} s)")
    print(f"cache: {s.path}" if s.committed else "cache: none written yet (nothing embedded)")
    if s.degenerate:
        print(f"warning: {s.degenerate}", file=sys.stderr)
    if s.committed and args.precision in ("int8", "mixed"):
        from featurize.runtimes.agreement import report_lines
        print(*report_lines(cache.read_attrs(s.path)), sep="\n")
    if s.interrupted:
        return 130
    return 1 if args.strict and s.failed_total else 0
