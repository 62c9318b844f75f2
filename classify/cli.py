"""`python -m classify` (train), `runs`, `predict`, `verify` and `finetune` (argparse)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from classify import _heads as heads, _runs as runs
from classify._options import FinetuneOptions, TrainOptions, defaults
from featurize.cli import command_line
from featurize.errors import ArgumentParser, check_range, run_command

TRAIN_HELP = ("Train a head on a featurize cache, evaluate it on a fixed seeded split, and "
              "save the run.")


def _command(p, name: str, description: str) -> ArgumentParser:
    """`p` (a subcommand's parser) with its description, or a parser of its own."""
    if p is None:
        return ArgumentParser(prog=f"python -m classify {name}", description=description)
    p.description = description
    return p


def _train_parser(p=None):
    d = defaults(TrainOptions)
    p = _command(p, "train", TRAIN_HELP)
    p.add_argument("--cache", help="cache file (default: the newest under data/cache/)")
    p.add_argument("--head", default=d["head"], help="default: %(default)s")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="head hyper-parameter, repeatable (e.g. --param C=10)")
    p.add_argument("--list-heads", action="store_true")
    p.add_argument("--min-per-class", type=int, default=d["min_per_class"])
    p.add_argument("--max-per-class", type=int, default=d["max_per_class"])
    p.add_argument("--test-size", type=float, default=d["test_size"])
    p.add_argument("--cv", type=int, default=d["cv"],
                   help="stratified K-fold instead of a held-out split")
    p.add_argument("--seed", type=int, default=d["seed"])
    norm = p.add_mutually_exclusive_group()
    norm.add_argument("--normalize", dest="normalize", action="store_true", default=d["normalize"],
                      help="L2-normalise embeddings (default: on for face backbones)")
    norm.add_argument("--no-normalize", dest="normalize", action="store_false")
    p.add_argument("--standardize", action="store_true", default=d["standardize"])
    p.add_argument("--pca", type=int, default=d["pca"], help="reduce to this many dimensions")
    p.add_argument("--open-set", action="store_true", default=d["open_set"],
                   help="hold out whole people as unknowns, report DIR/FAR, and learn the "
                        "threshold below which predict answers unknown")
    p.add_argument("--unknown-fraction", type=float, default=d["unknown_fraction"],
                   help="share of the people held out when --min-per-class excludes no one "
                        "(default: %(default)s)")
    p.add_argument("--max-unknown", type=int, default=d["max_unknown"],
                   help="unknown probe images at most (default: %(default)s)")
    p.add_argument("--target-far", type=float, default=d["target_far"],
                   help="false-alarm rate the learnt threshold aims at (default: %(default)s)")
    p.add_argument("--out", help="run folder (default: runs/<timestamp>-<head>)")
    p.add_argument("--runs-dir", default=str(runs.DEFAULT_DIR))
    return p


def train_options(args) -> TrainOptions:
    """The parsed command line as TrainOptions, which checks every value (--param's
    key=value strings become a dict there, through the validation a Python dict gets)."""
    return TrainOptions(args.head, args.param, args.min_per_class, args.max_per_class,
                        args.test_size, args.cv, args.seed, args.normalize, args.standardize,
                        args.pca, open_set=args.open_set,
                        unknown_fraction=args.unknown_fraction, max_unknown=args.max_unknown,
                        target_far=args.target_far)


def _predict_parser(p=None):
    p = _command(p, "predict", "Predict classes of new images with a saved run.")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--run", required=True, help="run folder made by python -m classify")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.add_argument("--trust-pickle", action="store_true", help=runs.TRUST_PICKLE_HELP)
    return p


def _verify_parser(p=None):
    p = _command(p, "verify", "LFW pair verification on a cache (10-fold protocol).")
    p.add_argument("--pairs", required=True, help="pairs.txt (View 2) or pairsDevTest.txt (View 1)")
    p.add_argument("--train-pairs", help="choose the threshold on this file (pairsDevTrain.txt)")
    p.add_argument("--cache", help="cache file (default: the newest under data/cache/)")
    p.add_argument("--metric", default="cosine", choices=["cosine", "euclidean"])
    p.add_argument("--skip-missing", action="store_true")
    p.add_argument("--out", help="new folder for verification.json, roc.png (ROC + DET) and "
                                 "report.html (default: runs/<timestamp>-verify)")
    p.add_argument("--runs-dir", default=str(runs.DEFAULT_DIR))
    p.add_argument("--roc", help="also write the ROC + DET picture to this file")
    p.add_argument("--json", action="store_true")
    return p


def _search_parser(p=None):
    from classify._search import SearchOptions
    d = defaults(SearchOptions)
    p = _command(p, "search", "The gallery images of a cache most similar to new images "
                 "(cosine distance; exact, or an approximate index stored beside large "
                 "caches).")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--cache", required=True, help="the gallery: a cache file made by featurize")
    p.add_argument("-k", "--k", type=int, default=d["k"], help="neighbours (default: %(default)s)")
    p.add_argument("--method", default=d["method"], help="auto (default: exact up to "
                   "--exact-max-rows gallery rows, approximate above), exact or approximate")
    p.add_argument("--exact-max-rows", type=int, default=d["exact_max_rows"],
                   help="largest gallery searched exactly by auto (default: %(default)s)")
    p.add_argument("--nprobe", type=int, default=d["nprobe"], help="approximate index: lists "
                   "scanned per query, more for higher recall (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    return p


def _serve_parser(p=None):
    from classify._serve import TOKEN_ENV, ServeOptions
    d = defaults(ServeOptions)
    p = _command(p, "serve", "Serve a run over HTTP: /predict, /search (with --cache), /embed, "
                 "/health, /info, a page at / and the API docs at /docs. Ctrl-C or SIGTERM "
                 "stops it.")
    p.add_argument("--run", required=True, help="run folder made by python -m classify")
    p.add_argument("--cache", help="a cache file to search as the gallery (/search)")
    p.add_argument("--host", default=d["host"], help="address to listen on (default: "
                   "%(default)s, this machine only; 0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=d["port"], help="default: %(default)s; 0: any free")
    p.add_argument("--token", default=d["token"], help="requests must send Authorization: "
                   f"Bearer TOKEN (default: ${TOKEN_ENV}, else no token)")
    p.add_argument("--max-batch", type=int, default=d["max_batch"],
                   help="images per model batch (default: %(default)s)")
    p.add_argument("--max-wait-ms", type=float, default=d["max_wait_ms"], help="longest a "
                   "batch waits for more images (default: %(default)s)")
    p.add_argument("--max-upload-bytes", type=int, default=d["max_upload_bytes"],
                   help="largest request body (default: %(default)s)")
    p.add_argument("--max-pixels", type=int, default=d["max_pixels"],
                   help="largest image (default: %(default)s pixels)")
    p.add_argument("--max-images", type=int, default=d["max_images"],
                   help="images per request (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=d["top_k"], help="default: %(default)s")
    p.add_argument("-k", "--k", type=int, default=d["k"],
                   help="gallery neighbours per image (default: %(default)s)")
    p.add_argument("--trust-pickle", action="store_true", help=runs.TRUST_PICKLE_HELP)
    return p


def _finetune_parser(p=None):
    d = defaults(FinetuneOptions)
    p = _command(p, "finetune", "Fine-tune the backbone of a run together with its head.")
    p.add_argument("--run", required=True, help="a dense or logreg run folder")
    p.add_argument("--unfreeze", dest="unfreeze_blocks", type=int, default=d["unfreeze_blocks"],
                   help="top blocks of the base to train")
    p.add_argument("--lr", type=float, default=d["lr"], help="Adam learning rate (%(default)s)")
    p.add_argument("--epochs", type=int, default=d["epochs"], help="at most this many epochs")
    p.add_argument("--batch-size", type=int, default=d["batch_size"])
    p.add_argument("--val-fraction", type=float, default=d["val_fraction"])
    p.add_argument("--no-augment", dest="augment", action="store_false", default=d["augment"])
    p.add_argument("--refeaturize", action="store_true", default=d["refeaturize"],
                   help="also write a new cache embedded with the fine-tuned base")
    p.add_argument("--out", help="new run folder (default: runs/<timestamp>-finetune)")
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--trust-pickle", action="store_true", help=runs.TRUST_PICKLE_HELP)
    return p


def _runs_parser(p=None):
    p = _command(p, "runs", "List runs.")
    p.add_argument("--runs-dir", default=str(runs.DEFAULT_DIR))
    p.add_argument("--html", metavar="OUT.html", help="write a self-contained page comparing "
                   "the runs (table, accuracy against training time) to this file")
    return p


def _parser() -> ArgumentParser:
    """The whole command line: one subparser per command (`train` is the default)."""
    p = ArgumentParser(prog="python -m classify", description=TRAIN_HELP,
                       epilog="python -m classify [OPTIONS] is python -m classify train "
                              "[OPTIONS]; each command has --help.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    for name, (arguments, _, help_text) in _COMMANDS.items():
        arguments(sub.add_parser(name, help=help_text))
    return p


def parse(argv: list[str]):
    """The parsed command line; without a command name first, the command is `train`."""
    if not argv or (argv[0] not in _COMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["train", *argv]
    return _parser().parse_args(argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    with command_line():  # SIGTERM as Ctrl-C, no TensorFlow start-up lines
        return run_command(_run, argv)


def _run(argv) -> int:
    args = parse(argv)
    return _COMMANDS[args.command][1](args)


def _train(args) -> int:
    from classify._api import train
    from classify._report import MAX_REPORT_CLASSES, format_metrics
    if args.list_heads:
        print(heads.describe_heads())
        return 0
    options = train_options(args)
    r = train(args.cache, options=options,
              save_to=runs.new_dir(args.head, args.out, args.runs_dir))
    print(f"cache: {r.cache}")
    for warning in r.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for note in r.notes:
        print(f"note: {note}")
    split = f"{args.cv}-fold CV" if args.cv else f"held-out {args.test_size:.0%}"
    print(f"{args.head}: {len(r.classes)} classes, {r.n_images} images, {split}, seed {args.seed}")
    if len(r.classes) <= MAX_REPORT_CLASSES:
        print(r.report_text)
    print(format_metrics(r.metrics))
    if "open_set" in r.metrics:
        from classify._openset import format_figures
        print(format_figures(r.metrics["open_set"]))
    print(f"train {r.train_seconds:.2f} s, predict {r.predict_seconds:.3f} s")
    print(f"run: {r.path}")
    return 0


def _runs(args) -> int:
    if args.html:
        from classify._html import runs_page
        page = runs_page(args.runs_dir, args.html)
        print(f"{page['runs']} runs: {page['html']}")
        return 0
    print(runs.table(args.runs_dir))
    return 0


def _predict(args) -> int:
    from classify._api import predict
    check_range("--top-k", args.top_k, 1)  # before the run is read, as predict checks it
    run = runs.Run.load(args.run, trust_pickle=args.trust_pickle)
    results = predict(args.images, run, args.top_k)
    # Exit 1 when an input could not be used (as featurize --strict), after printing the rest.
    status = 1 if any("error" in r for r in results) else 0
    if args.json:
        print(json.dumps(results, indent=2))
        return status
    for r in results:
        if "error" in r:
            print(f"{r['path']}: error: {r['error']}")
            continue
        kind = next(k for k in r["top"][0] if k != "class")  # probability, distance or score
        top = ", ".join(f"{t['class']} {t[kind]:.3f}" for t in r["top"])
        known = "" if "score" not in r else (  # an --open-set run
            f"open-set score {r['score']:.3f} {'<' if r['score'] < r['threshold'] else '>='} "
            f"threshold {r['threshold']:.3f}; ")
        print(f"{r['path']}: {r['prediction']}  ({known}{kind}: {top})")
    return status


def _verify(args) -> int:
    from classify._api import verify
    v = verify(args.cache, args.pairs, args.train_pairs, args.metric, args.skip_missing,
               args.roc, runs.new_dir("verify", args.out, args.runs_dir))
    if args.json:
        print(json.dumps(v.as_dict(), indent=2))
        return 0
    print(f"cache: {v.cache}\npairs: {v.pairs} ({v.skipped} skipped), metric {v.metric}")
    if v.threshold is not None:
        print(f"threshold {v.threshold:.4f} chosen on {v.train_pairs}: "
              f"accuracy {v.accuracy_all:.4f}")
    print(f"accuracy {v.accuracy:.4f} ± {v.accuracy_std:.4f} over "
          f"{len(v.fold_accuracies)} folds, ROC AUC {v.roc_auc:.4f}")
    if v.roc_png:
        print(f"roc: {v.roc_png}")
    print(f"report: {v.out}/report.html")
    return 0


def _search(args) -> int:
    from classify._search import Gallery, SearchOptions
    gallery = Gallery(args.cache, SearchOptions(args.k, args.method, args.exact_max_rows,
                                                args.nprobe),
                      log=lambda message: print(f"note: {message}", file=sys.stderr))
    for note in gallery.notes:  # e.g. exact search of a large cache without faiss
        print(f"note: {note}", file=sys.stderr)
    results = gallery.search(args.images)
    status = 1 if any("error" in r for r in results) else 0  # as predict
    if args.json:
        print(json.dumps({"cache": str(gallery.path), "method": gallery.method,
                          "results": results}, indent=2))
        return status
    print(f"{gallery.method} search of {gallery.rows:,} gallery rows, k={args.k}")
    for r in results:
        if "error" in r:
            print(f"{r['query']}: error: {r['error']}")
            continue
        print(f"{r['query']}:")
        for n, hit in enumerate(r["neighbours"], 1):
            print(f"  {n:>3}  {hit['distance']:.4f}  {hit['label'] or '-'}  {hit['path']}")
    return status


def _serve(args) -> int:
    from classify._serve import ServeOptions, serve
    # every ServeOptions field is a flag of the same name: checked before the run is read
    options = ServeOptions(**{name: getattr(args, name) for name in defaults(ServeOptions)})
    serve(args.run, args.cache, options, trust_pickle=args.trust_pickle)
    print("stopped")
    return 0


def _finetune(args) -> int:
    from classify._api import finetune as finetune_api
    from classify._finetune import summary
    from classify._report import format_metrics
    opts = FinetuneOptions(args.unfreeze_blocks, args.lr, args.epochs, args.batch_size,
                           args.val_fraction, args.augment, args.refeaturize, args.seed)
    run = runs.Run.load(args.run, trust_pickle=args.trust_pickle)
    save_to = runs.new_dir("finetune", args.out, Path(args.run).parent)
    r = summary(finetune_api(run, save_to=save_to, options=opts))
    print(f"trained {len(r['trained_layers'])} layers for {r['epochs_run']} epochs "
          f"({r['seconds_per_epoch']:.1f} s per epoch); validation loss "
          f"{r['validation_loss'][0]:.4f} -> {r['validation_loss'][1]:.4f}"
          + ("" if r["paid"] else ": did not pay, original weights kept"))
    print(f"before: {format_metrics(r['before'])}")
    print(f"after:  {format_metrics(r['after'])}")
    if "cache" in r:
        print(f"new cache with the fine-tuned base: {r['cache']}")
    print(f"run: {r['run_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


# command -> (its arguments, its handler, its line in --help)
_COMMANDS = {
    "train": (_train_parser, _train, "train and evaluate a head on a cache (the default)"),
    "runs": (_runs_parser, _runs, "list the runs (--html: a page comparing them)"),
    "predict": (_predict_parser, _predict, "top classes of new images with a run"),
    "verify": (_verify_parser, _verify, "LFW pair verification on a cache"),
    "finetune": (_finetune_parser, _finetune, "fine-tune a run's backbone with its head"),
    "search": (_search_parser, _search, "the gallery images most similar to new images"),
    "serve": (_serve_parser, _serve, "serve a run over HTTP: an API and a page"),
}
COMMANDS = tuple(name for name in _COMMANDS if name != "train")
