"""`python -m classify` (train), `runs`, `predict`, `verify` and `finetune` (argparse)."""

from __future__ import annotations

import json
import sys

from featurize.cli import command_line
from featurize.errors import ArgumentParser, check_range, run_command

from . import heads, runs
from .options import TrainOptions, defaults

COMMANDS = ("runs", "predict", "verify", "finetune", "search")


def _train_parser():
    d = defaults(TrainOptions)
    p = ArgumentParser(
        prog="python -m classify",
        description="Train a head on a featurize cache, evaluate it on a fixed seeded split, "
                    "and save the run. Other commands: " + ", ".join(COMMANDS) + ".")
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


def _predict_parser():
    p = ArgumentParser(prog="python -m classify predict",
                       description="Predict classes of new images with a saved run.")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--run", required=True, help="run folder made by python -m classify")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.add_argument("--trust-pickle", action="store_true", help=runs.TRUST_PICKLE_HELP)
    return p


def _verify_parser():
    p = ArgumentParser(prog="python -m classify verify",
                       description="LFW pair verification on a cache (10-fold protocol).")
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


def _search_parser():
    from .search import SearchOptions
    d = defaults(SearchOptions)
    p = ArgumentParser(prog="python -m classify search",
                       description="The gallery images of a cache most similar to new images "
                                   "(cosine distance; exact, or an approximate index stored "
                                   "beside large caches).")
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


def _runs_parser():
    p = ArgumentParser(prog="python -m classify runs", description="List runs.")
    p.add_argument("--runs-dir", default=str(runs.DEFAULT_DIR))
    p.add_argument("--html", metavar="OUT.html", help="write a self-contained page comparing "
                   "the runs (table, accuracy against training time) to this file")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else "train"
    rest = argv[1:] if command != "train" else argv
    with command_line():  # SIGTERM as Ctrl-C, no TensorFlow start-up lines
        return run_command({"train": _train, "runs": _runs, "predict": _predict,
                            "verify": _verify, "finetune": _finetune,
                            "search": _search}[command], rest)


def _train(argv) -> int:
    from .api import train
    from .report import MAX_REPORT_CLASSES, format_metrics
    args = _train_parser().parse_args(argv)
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
        from .openset import format_figures
        print(format_figures(r.metrics["open_set"]))
    print(f"train {r.train_seconds:.2f} s, predict {r.predict_seconds:.3f} s")
    print(f"run: {r.path}")
    return 0


def _runs(argv) -> int:
    args = _runs_parser().parse_args(argv)
    if args.html:
        from .html import runs_page
        page = runs_page(args.runs_dir, args.html)
        print(f"{page['runs']} runs: {page['html']}")
        return 0
    print(runs.table(args.runs_dir))
    return 0


def _predict(argv) -> int:
    from .api import predict
    args = _predict_parser().parse_args(argv)
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


def _verify(argv) -> int:
    from .api import verify
    args = _verify_parser().parse_args(argv)
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


def _search(argv) -> int:
    from .search import Gallery, SearchOptions
    args = _search_parser().parse_args(argv)
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


def _finetune(argv) -> int:
    from .finetune import main as finetune_main
    return finetune_main(argv)
