"""Render the results tables from benchmarks/results/*.json (nothing typed by hand): every
table into docs/results.md, one headline table into README.md, each between its markers.

    python benchmarks/readme_tables.py            # print them
    python benchmarks/readme_tables.py --write    # replace those sections of docs/results.md and README.md
"""

from __future__ import annotations

import json
import re
import sys

from common import REPO, RESULTS


def load(name):
    path = RESULTS / f"{name}.json"
    r = json.loads(path.read_text()) if path.exists() else None
    if r and "command" in r:  # paths of the measuring machine: named by what they hold
        r["command"] = re.sub(r"\S*lfw-deepfunneled(-\w+)?__dlib-resnet__\S+\.h5",
                              "LFW_DLIB_CACHE.h5", r["command"])
        r["command"] = re.sub(r"--lfw /\S+", "--lfw LFW_DIR", r["command"])
    return r


def machine(r) -> str:
    m = r["machine"]
    if m.get("gpu"):
        return f"**GPU machine**: {m['gpu']}, {m['cpus']} cores, {m.get('backend', '-')}"
    return f"{m['cpus']}-core CPU, {m.get('backend', '-')}"


def img_s(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def lfw_tables(out):
    r = load("lfw_dlib_resnet")
    if not r:
        return
    ident, v = r["identification"], r["verification_view1"]
    out.append("## LFW with `dlib-resnet` (real pretrained weights)\n")
    out.append("Identification: stratified 75/25 split, seed 0; the same split for every head.\n")
    out.append("| head | >=20 images: 62 people, accuracy | macro F1 | train s | >=70 images: 7 people, accuracy | macro F1 |")
    out.append("|---|---|---|---|---|---|")
    for head, row in ident["min_20"].items():
        seven = ident["min_70"].get(head, {})
        out.append(f"| {head} | {row['accuracy']:.4f} | {row['macro_f1']:.4f} | "
                   f"{row['train_seconds']:.2f} | {seven.get('accuracy', float('nan')):.4f} | "
                   f"{seven.get('macro_f1', float('nan')):.4f} |")
    eig = next(v for k, v in ident["min_70"].items() if k.startswith("eigenfaces"))
    out.append(f"| scikit-learn eigenfaces + SVM example, same >=70 split | | | | "
               f"{eig['accuracy']:.4f} | {eig['macro_f1']:.4f} |")
    out.append("")
    out.append(f"Verification, View 1 ({v['pairs']} pairs of pairsDevTest.txt, cosine distance): "
               f"threshold {v['threshold_from_devtrain']:.4f} chosen on pairsDevTrain.txt gives "
               f"**{v['devtest_accuracy']:.4f}**; the 10-fold protocol within pairsDevTest.txt "
               f"gives {v['devtest_10fold_accuracy']:.4f} ± {v['devtest_10fold_std']:.4f}, ROC AUC "
               f"{v['roc_auc']:.4f}. dlib publishes 0.9938 on View 2 (pairs.txt, which these figures do "
               "not use).\n")
    how = (f"embedded {r['embedded_now']} images in {r['embed_seconds']:.0f} s" if r["embedded_now"]
           else f"reused the cache of all {r['images']} images ({r['embed_seconds']:.1f} s)")
    out.append(f"This run {how}; command: `{r['command']}`\n")


def plumbing_table(out):
    rows = [load(n) for n in ("lfw_vggface_resnet50_random", "lfw_vggface_senet50_random",
                              "lfw_vggface_vgg16_random")]
    rows = [r for r in rows if r]
    if not rows:
        return
    out.append("## VGGFace backbones with `--weights none` (plumbing only)\n")
    out.append("These runs use seeded random weights instead of the published VGGFace weights: "
               "they prove the pipeline end to end; **their accuracy says nothing about "
               "VGGFace**. With the real weight files the architecture gives the original's "
               "outputs (equivalence table below).\n")
    out.append("| backbone | images | >=20 logreg accuracy | >=70 logreg accuracy | View 1 accuracy | command |")
    out.append("|---|---|---|---|---|---|")
    for r in rows:
        ver = r.get("verification_view1", {}).get("devtest_accuracy")
        out.append(f"| {r['backbone']} ({r['input_size']}px) | {r['images']} | "
                   f"{r['identification']['min_20']['logreg']['accuracy']:.4f} | "
                   f"{r['identification']['min_70']['logreg']['accuracy']:.4f} | "
                   f"{'-' if ver is None else f'{ver:.4f}'} | `{r['command']}` |")
    out.append("")


def speed_tables(out):
    out.append("## Speed and memory\n")
    out.append("| what | figure | machine | command |")
    out.append("|---|---|---|---|")
    for name in sorted(p.stem for p in RESULTS.glob("throughput_*.json")):
        t = load(name)
        if t["backbone"] == "dlib-resnet":  # all its work (detect, align, describe) is per image
            out.append(f"| featurize `dlib-resnet`, {t['images']} LFW images | "
                       f"{t['end_to_end_img_s']:.1f} img/s with {t['workers']} worker processes "
                       f"({t['decode_one_worker_img_s']:.1f} img/s on one) | {machine(t)} | "
                       f"`{t['command']}` |")
            continue
        dec = t["decode"]
        gpu = (f"; GPU busy {t['gpu_utilisation_pct']:.0f}% of the time"
               if t.get("gpu_utilisation_pct") is not None else "")
        out.append(f"| featurize `{t['backbone']}` {t['precision']}, resize on the "
                   f"{'accelerator' if t['resize'] == 'device' else 'CPU'}, {t['input_size']}px, "
                   f"{t['images']:,} LFW images, batch {t['batch_size']} | "
                   f"**{img_s(t['end_to_end_img_s'])} img/s** = {t['ratio_to_ceiling']:.0%} of "
                   f"min(model {img_s(t['model_img_s'])}, decode "
                   f"{img_s(t['decode_all_workers_img_s'])}) "
                   f"({img_s(t['end_to_end_wall_img_s'])} img/s counting the workers' start); "
                   f"compile {t['compile_seconds']:.1f} s{gpu}. Decoding with {t['workers']} "
                   f"workers: Pillow {dec['pillow']['all_workers_img_s']:,.0f}, fast path "
                   f"{dec['fast']['all_workers_img_s']:,.0f}, fast path without the resize "
                   f"{dec['fast_no_resize']['all_workers_img_s']:,.0f} img/s "
                   f"| {machine(t)} | `{t['command']}` |")
    c = load("cache_hit")
    if c:
        out.append(f"| re-run on the fully cached LFW (13,233 images), whole command | "
                   f"{c['seconds_best']:.2f} s | {machine(c)} | `{c['command']}` |")
    m = load("memory")
    if m:
        a, b = m["rows"][0], m["rows"][-1]
        out.append(f"| peak RSS, {a['images']} vs {b['images']} images | {a['peak_rss_mb']:.0f} MB vs "
                   f"{b['peak_rss_mb']:.0f} MB (x{m['ratio_largest_to_smallest']:.2f}) | "
                   f"{machine(m)} | `{m['command']}` |")
    v = load("vs_refit")
    if v:
        out.append(f"| featurize once + logreg vs base re-run every epoch ({v['epochs']} epochs, "
                   f"{v['images']} images, {v['backbone']} {v['input_size']}px) | "
                   f"{v['featurize_once_plus_logreg_seconds']:.1f} s vs "
                   f"{v['refit_every_epoch_seconds']:.1f} s: **{v['speedup']:.1f}x** | {machine(v)} "
                   f"| `{v['command']}` |")
    for name in sorted(p.stem for p in RESULTS.glob("finetune_*.json")):
        f = load(name)
        weights = "random" if f["weights"] == "none" else f["weights"]
        out.append(f"| fine-tune `{f['backbone']}` ({weights} weights, {f['input_size']}px), "
                   f"{f['train_images']} training-split images, top block | "
                   f"{f['seconds_per_epoch']:.0f} s per epoch | {machine(f)} | `{f['command']}` |")
    out.append("")


def heads_table(out):
    sources = [("lfw_dlib_resnet", "dlib LFW embeddings, 3,023 x 128, 62 classes"),
               ("heads_lifted_2048d", "the same lifted to 2,048-D by a fixed random ReLU layer "
                                      "(real class structure at ResNet-50's width)"),
               ("heads_2048d", "vggface-resnet50 random-weight embeddings, 3,023 x 2,048 (no "
                               "class structure: the worst case)")]
    rows = []
    for name, what in sources:
        r = load(name)
        if not r:
            continue
        if "rows" in r:
            times = {row["head"]: (row["train_seconds"], row["accuracy"]) for row in r["rows"]}
        else:
            times = {h: (v["train_seconds"], v["accuracy"])
                     for h, v in r["identification"]["min_20"].items() if "train_seconds" in v}
        rows.append((what, times, r["command"], machine(r)))
    if not rows:
        return
    heads = list(rows[0][1])
    out.append("## Head training time (seconds, accuracy in brackets)\n")
    out.append("| embeddings | " + " | ".join(heads) + " | machine | command |")
    out.append("|---" * (len(heads) + 3) + "|")
    for what, times, command, where in rows:
        cells = " | ".join(f"{times[h][0]:.2f} ({times[h][1]:.3f})" if h in times else "-"
                           for h in heads)
        out.append(f"| {what} | {cells} | {where} | `{command}` |")
    out.append("")


def equivalence_table(out):
    e = load("vggface_equivalence")
    if not e:
        return
    out.append("## Same outputs as keras-vggface 0.6\n")
    out.append("The original (TensorFlow 2.15, Keras 2) builds each model with random weights and "
               "saves them with Keras 2's `save_weights`, the layout of the published files; "
               "featurize loads that file and embeds the same raw images.\n")
    out.append("| model | weighted layers, same names and shapes | max abs difference | relative to output scale |")
    out.append("|---|---|---|---|")
    for r in e["results"]:
        diff = max(r["model_max_abs_diff"], r.get("featurize_max_abs_diff", 0))
        out.append(f"| {r['arch']} {'top' if r['top'] else 'no top'} | {r['weighted_layers']}, "
                   f"{'yes' if r['same_layer_names_and_shapes'] else 'NO'} | {diff:.1e} | "
                   f"{r['relative_diff']:.1e} |")
    out.append("\nCommand: `python benchmarks/vggface_equivalence.py --reference-python "
               "REFVENV/bin/python --top` (see benchmarks/README.md).\n")


def scale_table(out):
    c = load("cache_scale")
    rays = [load(p.stem) for p in sorted(RESULTS.glob("ray_overhead_*.json"))]
    if not c and not rays:
        return
    out.append("## Scale: the sharded cache and `--engine ray`\n")
    out.append("| what | figure | goal | machine | command |")
    out.append("|---|---|---|---|---|")
    if c:
        rows, dim, where, cmd = f"{c['rows']:,}", c["dim"], machine(c), c["command"]
        a, h, r = c["append"], c["hit"], c["read"]
        out.append(f"| append {a['rows_added']:,} rows to a {rows} x {dim} cache "
                   f"({a['cache_bytes'] / 1e9:.2f} GB): a new shard + a new index | "
                   f"**{a['total_seconds']:.2f} s**, writes {a['bytes_written'] / 1e6:.1f} MB = "
                   f"**{100 * a['written_fraction']:.2f}%** of the cache's bytes | < 5 s, < 2% | "
                   f"{where} | `{cmd}` |")
        fresh = c.get("fresh_hit")
        also = (f" ({fresh['seconds']:.2f} s before the append, when the shards hold "
                "consecutive paths as one run writes them)" if fresh else "")
        out.append(f"| cache hit on all {h['rows']:,} rows after the append (the cache's state, "
                   f"the to-do list, the up-to-date check; listing the folder not included) | "
                   f"**{h['seconds']:.2f} s**{also} | < 3 s | {where} | `{cmd}` |")
        out.append(f"| `open_cache(...).X`, all {r['rows']:,} rows | {r['open_cache_x_mb_s']:,.0f} "
                   f"MB/s = {r['open_cache_vs_raw']:.2f} x reading the shard files' bytes into "
                   f"new arrays ({r['raw_mb_s']:,.0f} MB/s from the page cache) | disk speed | "
                   f"{where} | `{cmd}` |")
        for m in c["commit_memory"]:
            out.append(f"| peak memory of a commit into {m['rows']:,} rows | {m['peak_mb']:,.0f} "
                       f"MB in all, of which the commit itself {m['commit_mb']:,.0f} MB (the "
                       f"rest: the dataset listing); the {m['embeddings_mb']:,.0f} MB of "
                       "embeddings are never loaded | flat in the cache's size | "
                       f"{where} | `{cmd}` |")
    if c:
        big = max(c["commit_memory"], key=lambda m: m["rows"])
        per_row = big["commit_mb"] * 2**20 / big["rows"]
        note = (f"Two goals are missed, and why: `open_cache(...).X` reads at "
                f"{c['read']['open_cache_vs_raw']:.2f} x the speed of reading the same files "
                "from the page cache: HDF5 checks each chunk's fletcher32 checksum and copies "
                "it out of its chunk buffer (the price of the bit-rot guarantee; about a third "
                "of HDF5's own speed), every row is checked for NaN, and the paths are decoded; "
                "from a "
                f"disk slower than about {c['read']['open_cache_x_mb_s']:,.0f} MB/s it reads at "
                f"disk speed. A commit's memory grows with the number of rows, about "
                f"{per_row:,.0f} bytes per row (the paths and fingerprints it compares with the "
                "folder's listing, which itself holds every path), but never with the "
                "embedding size: rows are never loaded, old shards never rewritten.\n")
    for r in rays:
        what = (f"featurize `{r['backbone']}`, {r['images']:,} LFW images: one process vs "
                f"`--engine ray` with ray.init(num_cpus={r['ray_num_cpus']}), whole calls")
        figure = (f"{img_s(r['local']['img_per_s'])} vs {img_s(r['ray']['img_per_s'])} img/s "
                  f"(Ray's start: {r['ray']['ray_start_s']:.1f} s): overhead "
                  f"**{100 * r['overhead']:+.1f}%**; caches equal (max difference "
                  f"{r['max_abs_difference']:.1e})")
        out.append(f"| {what} | {figure} | within 25% | {machine(r)} | `{r['command']}` |")
    out.append("")
    if c:
        out.append(note)


RUNTIME_NAMES = {"keras_fp32": "`--runtime keras`", "onnx_fp32": "`--runtime onnx`",
                 "openvino_fp32": "OpenVINO fp32 (the default)",
                 "keras_mixed": "`--precision mixed --runtime keras`",
                 "openvino_bf16": "`--precision mixed` (OpenVINO bfloat16)",
                 "onnx_int8": "`--precision int8` (ONNX Runtime)"}


def runtimes_table(out):
    """benchmarks/runtimes.py: each CPU runtime and precision, per CPU-second, with its
    agreement with float32 and the whole command."""
    r = load("runtimes_cpu")
    if not r or "model_only" not in r:
        return
    p = r["peaks"]
    out.append("## CPU runtimes and precisions (`--runtime`, `--precision`)\n")
    out.append(f"`{r['backbone']}` at {r['input_size']} px, `--weights {r['weights']}`, batch "
               f"{r['batch_size']}, model only (prepared images, contenders interleaved), "
               f"images per CPU-second of the process; CPU: {p['vendor']} family "
               f"{p['cpu_family']}, {p['cores']} cores at {p['ghz']:.2f} GHz, flags "
               f"{', '.join(p['flags'])}. Centred cosine: the cosine after subtracting the mean "
               "float32 embedding of the held-out images.\n")
    out.append("| runtime / precision | wall img/s | img per CPU-s | vs default | share of "
               "peak | centred cosine to fp32 (mean / min) | logreg top-1 agreement |")
    out.append("|---|---|---|---|---|---|---|")
    for key, row in r["model_only"].items():
        q = r["agreement_vs_fp32"].get(key)
        agree = (f"{q['mean_centred_cosine']:.5f} / {q['min_centred_cosine']:.5f}" if q
                 else "(the reference)")
        top1 = f"{100 * q['logreg_top1_agreement']:.0f}%" if q else ""
        out.append(f"| {RUNTIME_NAMES.get(key, key)} | {row['img_s']:.1f} | "
                   f"{row['img_per_cpu_s']:.1f} | {row['per_cpu_s_vs_openvino_fp32']:.2f}x | "
                   f"{row['share_of_peak']:.2f} | {agree} | {top1} |")
    runs = r["whole_command"]["runs"]
    out.append(f"\nWhole command, `python -m featurize DIR` on {r['whole_command']['images']} "
               f"LFW images: float32 {runs['float32_again']['wall_s']:.1f} s "
               f"({runs['float32_again']['cpu_s']:.1f} CPU-s); `--precision mixed` "
               f"{runs['mixed_kept_report']['wall_s']:.1f} s "
               f"({runs['mixed_kept_report']['cpu_s']:.1f} CPU-s, "
               f"{runs['mixed_kept_report']['speedup_cpu']:.2f}x) with its agreement report "
               f"already kept, {runs['mixed_fresh_report']['wall_s']:.1f} s "
               f"({runs['mixed_fresh_report']['speedup_cpu']:.2f}x) the first time on a model and "
               "dataset sample, which embeds 128 held-out images twice for the report.")
    out.append(f"\n{machine(r)}; command: `{r['command']}`\n")


def section(out, r, title: str, intro: str, body: str) -> None:
    """One generated subsection: a title, what was measured, the table, machine and command."""
    out.append(f"## {title}\n")
    out.append(intro)
    out.append(body)
    out.append(f"\n{machine(r)}; command: `{r['command']}`\n")


def lfw_gap_table(out):
    """benchmarks/lfw_gap.py: every step of dlib's face chip measured on LFW View 1."""
    r = load("lfw_gap")
    if not r:
        return
    from lfw_gap import table  # benchmarks/lfw_gap.py renders its own JSON
    section(out, r, "dlib-resnet on LFW View 1: where the points go",
            "10-fold protocol over the 3,200 View 1 pairs (each fold's threshold from the other "
            "nine), the DevTrain threshold applied to DevTest, and 10-fold within DevTest; the "
            "reasons are in [Faces](faces.md#lfw). featurize's figure (its default settings) "
            "is the first row.\n", table(r))


def openset_table(out):
    """benchmarks/openset_lfw.py: open-set identification on LFW, three seeds."""
    r = load("openset_lfw")
    if not r:
        return
    c = r["counts"][0]
    intro = (f"Known: the {c['known_identities']} people with >= {r['min_per_class']} images "
             f"({c['train_images']:,} training images, {c['known_probes']} known probes); "
             f"unknown probes: {r['max_unknown']:,} images of whole people with fewer; the "
             f"threshold learnt for a target FAR of {r['target_far']} without the probes "
             f"(`threshold_from`: {c['run_threshold_from']}). Mean ± std over seeds "
             f"{', '.join(map(str, r['seeds']))}. DIR@FAR columns use the oracle threshold "
             "(the standard curve); the last two what the learnt threshold gives.\n")
    section(out, r, "Open-set identification on LFW (`dlib-resnet`, `--open-set`)", intro,
            r["table"])


def search_tables(out):
    """benchmarks/search.py: exact vs approximate gallery search, LFW and 1M x 512."""
    r = load("search")
    if not r:
        return
    from search import markdown  # benchmarks/search.py: its own tables from its JSON
    out.append("## Gallery search (`classify search`): recall@10 and queries per second\n")
    out.append("Recall@10 against exact search; q/s with one search thread (builds use both "
               "cores). The synthetic rows are a seeded Gaussian mixture of 1,000 centres, "
               "which suits IVF's lists: LFW is the realistic recall.")
    out.append(markdown(r["parts"]))
    out.append(f"\n{machine(r)}; command: `{r['command']}`")
    h = load("search_hnswlib_1m")
    if h:
        out.append("\nhnswlib on all 1,000,000 rows, same data and queries:")
        out.append(markdown(h["parts"]))
        out.append(f"\ncommand: `{h['command']}`")
    out.append("")


def reports_table(out):
    """benchmarks/reports_lfw.py: what the reports weigh and cost on a real LFW run."""
    r = load("reports_lfw")
    if not r:
        return
    m, v, cost = r["map"], r["verify"], r["report_cost"]
    mb = lambda n: f"{n / 1e6:.2f} MB"  # noqa: E731
    out.append("## Reports and the embedding map (LFW, `dlib-resnet`, >= 20 images)\n")
    out.append("| what | figure |")
    out.append("|---|---|")
    out.append(f"| `report.html` of a logreg / ridge run | {mb(r['run_logreg']['report_bytes'])}"
               f" / {mb(r['run_ridge']['report_bytes'])} |")
    out.append(f"| time the report adds to saving a logreg run | "
               f"{cost['report_adds_s_median']:.2f} s (median of "
               f"{len(cost['save_with_report_s'])}; training {cost['train_seconds']:.1f} s) |")
    out.append(f"| verification report (View 1) | {mb(v['report_bytes'])}; accuracy "
               f"{v['accuracy']:.4f}, ROC AUC {v['roc_auc']:.4f} |")
    out.append(f"| `runs --html` page | {mb(r['runs_page']['bytes'])} |")
    out.append(f"| `featurize map`, {m['method']} of {m['rows']:,} of {m['cache_rows']:,} rows |"
               f" {m['seconds']:.1f} s projection; HTML {mb(m['html_bytes'])} with "
               f"{m['thumbnails']} hover thumbnails |")
    out.append(f"\n{machine(r)}, shared with other jobs (timings are upper bounds); command: "
               f"`{r['command']}`\n")


def headline(out):
    """README.md's one table: a few figures from the files above, each with its command."""
    rows = []
    r = load("lfw_dlib_resnet")
    if r:
        logreg, v = r["identification"]["min_20"]["logreg"], r["verification_view1"]
        rows.append(("LFW identification, 62 people (>= 20 images), `dlib-resnet` + `logreg`",
                     f"accuracy **{logreg['accuracy']:.4f}**, head trained in "
                     f"{logreg['train_seconds']:.2f} s", r))
        rows.append(("LFW View 1 verification (pairsDevTest, threshold from pairsDevTrain), "
                     "`dlib-resnet`", f"**{v['devtest_accuracy']:.4f}**, ROC AUC "
                     f"{v['roc_auc']:.4f}", r))
    j = load("jitter_curve")
    if j:
        m = j["curve"]["jitter 4"]["euclidean"]
        rows.append(("LFW View 1 verification, `dlib-resnet --tta accurate`, 10-fold over "
                     "3,200 pairs (euclidean)",
                     f"**{m['tenfold_accuracy']:.4f}** ± {m['tenfold_std']:.4f}", j))
    o = load("openset_lfw")
    if o:
        run = next(v for k, v in o["summary"].items() if k.startswith("run "))
        rows.append(("open-set LFW (`--open-set`, target FAR 0.01, threshold learnt without "
                     "the probes)", f"DIR **{run['dir']['mean']:.4f}** at FAR "
                     f"{run['far']['mean']:.4f}", o))
    t = load("throughput_vggface_resnet50_mixed_device_gpu")
    if t:
        rows.append((f"featurize `{t['backbone']}`, `--precision mixed --resize device`, "
                     f"{t['images']:,} LFW images", f"**{img_s(t['end_to_end_img_s'])} img/s**", t))
    v = load("vs_refit")
    if v:
        rows.append(("featurize once + logreg vs the frozen base re-run every epoch "
                     f"({v['epochs']} epochs)", f"**{v['speedup']:.1f}x** faster", v))
    c = load("cache_hit")
    if c:
        rows.append(("re-run on the fully cached LFW (13,233 images), whole command",
                     f"**{c['seconds_best']:.2f} s**", c))
    s = load("cache_scale")
    if s:
        a = s["append"]
        rows.append((f"append {a['rows_added']:,} rows to a {s['rows']:,}-row cache",
                     f"**{a['total_seconds']:.2f} s**", s))
    if not rows:
        return
    out.append("| what | figure | machine | command |")
    out.append("|---|---|---|---|")
    for what, figure, r in rows:
        out.append(f"| {what} | {figure} | {machine(r)} | `{r['command']}` |")


def write_between(path, begin: str, end: str, text: str) -> None:
    current = path.read_text()
    start, stop = current.index(begin) + len(begin), current.index(end)
    path.write_text(current[:start] + "\n\n" + text + "\n" + current[stop:])
    print(f"-> {path.relative_to(REPO)}")


BEGIN, END = "<!-- results: generated by benchmarks/readme_tables.py -->", "<!-- end of results -->"
HEADLINE = ("<!-- headline: generated by benchmarks/readme_tables.py -->",
            "<!-- end of headline -->")


def main():
    out = []
    lfw_tables(out)
    lfw_gap_table(out)
    openset_table(out)
    search_tables(out)
    reports_table(out)
    plumbing_table(out)
    heads_table(out)
    speed_tables(out)
    runtimes_table(out)
    scale_table(out)
    equivalence_table(out)
    text = "\n".join(out)
    top = []
    headline(top)
    top = "\n".join(top)
    if "--write" not in sys.argv:
        print(top + "\n\n" + text)
        return
    write_between(REPO / "docs" / "results.md", BEGIN, END, text)
    write_between(REPO / "README.md", *HEADLINE, top)


if __name__ == "__main__":
    main()
