"""`python -m featurize map CACHE`: a 2-D map of a cache's embeddings, coloured by class.

UMAP when umap-learn is installed (the `map` extra), else scikit-learn's t-SNE; PCA for a
quick look. Writes `map-<method>.png` and `map-<method>.html` (an inline SVG where hovering
over a point shows its image path and a thumbnail; nothing is fetched at view time) into
`--out`, by default the folder `<cache name>.map/` beside the cache: never the current folder.
Large caches are sampled (`--sample`); the run says how many rows it drew and how long it took.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featurize import atomic
from featurize.errors import OptionError, UserError, check_range
from featurize.reporting import BLANK_GIF, palette, thumbnail_uri

METHODS = ("umap", "tsne", "pca")
DEFAULT_SAMPLE = 5000  # t-SNE on 5,000 rows takes about a minute on 2 cores
DEFAULT_THUMBNAILS = 1000  # ~1.5 KB each inlined: keeps the page to a couple of MB
LABELLED_CLASSES = 80  # class names are written on the map up to this many classes
LEGEND_CLASSES = 30


def umap_installed() -> bool:
    return importlib.util.find_spec("umap") is not None


@dataclass(frozen=True)
class MapOptions:
    """How a map is drawn. `method=None`: UMAP when installed, else t-SNE."""

    method: str | None = None
    sample: int = DEFAULT_SAMPLE
    min_per_class: int = 1
    thumbnails: int = DEFAULT_THUMBNAILS
    seed: int = 0

    def __post_init__(self):
        if self.method is None:
            object.__setattr__(self, "method", "umap" if umap_installed() else "tsne")
        if self.method not in METHODS:
            raise OptionError("method", f"must be one of {', '.join(METHODS)}, not "
                                        f"{self.method!r}.")
        if self.method == "umap" and not umap_installed():
            raise UserError("--method umap needs umap-learn: pip install umap-learn (or "
                            "'featurize-embeddings[map]'), or use --method tsne or pca.")
        check_range("sample", self.sample, 10)
        check_range("min_per_class", self.min_per_class, 1)
        check_range("thumbnails", self.thumbnails, 0)
        check_range("seed", self.seed, 0, 2**32 - 1)


def project(X: np.ndarray, method: str, seed: int = 0) -> np.ndarray:
    """(N, 2) coordinates of the rows of X."""
    from sklearn.decomposition import PCA
    if method == "pca" or len(X) < 5:
        return PCA(2, random_state=seed).fit_transform(X)
    if method == "umap":
        import umap
        return umap.UMAP(n_components=2, n_neighbors=min(15, len(X) - 1),
                         random_state=seed).fit_transform(X)
    from sklearn.manifold import TSNE
    if X.shape[1] > 50:  # the usual t-SNE recipe: PCA to 50 first, faster and less noisy
        X = PCA(min(50, *X.shape), random_state=seed).fit_transform(X)
    return TSNE(2, init="pca", perplexity=min(30.0, (len(X) - 1) / 3),
                random_state=seed).fit_transform(X)


def _rows(c, options: MapOptions) -> tuple[np.ndarray, int]:
    """The rows drawn (classes with at least --min-per-class images, sampled) and how many
    were eligible."""
    labels = c.labels
    if c.labelled and options.min_per_class > 1:
        counts = np.bincount(labels[labels >= 0], minlength=len(c.classes))
        eligible = np.flatnonzero((labels >= 0) & (counts[np.maximum(labels, 0)]
                                                    >= options.min_per_class))
    else:
        eligible = np.arange(len(labels))
    if len(eligible) < 3:
        raise UserError(f"{c.path}: only {len(eligible)} rows have classes with at least "
                        f"{options.min_per_class} images; lower --min-per-class.")
    n_eligible = len(eligible)
    if n_eligible > options.sample:
        rng = np.random.default_rng(options.seed)
        eligible = np.sort(rng.choice(eligible, options.sample, replace=False))
    return eligible, n_eligible


def default_out(cache_path) -> Path:
    p = Path(cache_path)
    return p.with_name(p.stem + ".map")


def make_map(cache_path, out=None, options: MapOptions | None = None, log=print) -> dict:
    """Draw the map of a cache into `out` (default: beside the cache); what was done."""
    from featurize import cache
    options = options or MapOptions()
    out = Path(out) if out else default_out(cache_path)
    _check_out(out)
    c = cache.read(cache_path)
    t0 = time.perf_counter()
    rows, n_eligible = _rows(c, options)
    sampled = f"a random sample of {len(rows)} (--sample)" if len(rows) < n_eligible else "all"
    log(f"{c.path}: {len(c.labels)} rows, {n_eligible} in classes of at least "
        f"{options.min_per_class} images; drawing {sampled} with {options.method}")
    xy = project(np.asarray(c.embeddings[rows], dtype=np.float32), options.method, options.seed)
    seconds = time.perf_counter() - t0
    points = _points(c, rows, xy)
    title = f"{Path(c.path).name}: {options.method}, {len(rows)} of {len(c.labels)} rows"
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"map-{options.method}.png"
    html = out / f"map-{options.method}.html"
    _write_atomic(png, _png_bytes(points, title))
    thumbs = _thumbnails(c, rows, options)
    _write_atomic(html, _html(points, thumbs, title, options.method).encode("utf-8"))
    facts = {"cache": str(c.path), "method": options.method, "rows": int(len(rows)),
             "cache_rows": int(len(c.labels)), "eligible_rows": int(n_eligible),
             "classes": len(points["classes"]),
             "seconds": seconds, "thumbnails": sum(t is not None for t in thumbs),
             "png": str(png), "html": str(html)}
    _write_atomic(out / f"map-{options.method}.json", json.dumps(facts, indent=2).encode())
    return facts


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the map.")
    parent = out
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write the map into {out}: {parent} is not writable; choose "
                        "another --out.")


def _points(c, rows, xy) -> dict:
    labels = c.labels[rows]
    names = [c.classes[k] if k >= 0 else "(unlabelled)" for k in labels]
    classes = sorted(set(names))
    index = {name: k for k, name in enumerate(classes)}
    return {"xy": xy, "class": np.array([index[n] for n in names]), "classes": classes,
            "paths": [c.paths[i] for i in rows], "colours": palette(len(classes))}


def _png_bytes(points, title: str) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    xy, cls, classes = points["xy"], points["class"], points["classes"]
    legend = len(classes) <= LEGEND_CLASSES
    fig = Figure(figsize=(11 if legend else 9, 8))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    colours = np.array(points["colours"])
    ax.scatter(xy[:, 0], xy[:, 1], c=colours[cls], s=10 if len(xy) < 5000 else 4,
               alpha=0.8, linewidths=0)
    if legend:
        for k, name in enumerate(classes):
            ax.scatter([], [], c=colours[k], s=20, label=name)
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, frameon=False)
    elif len(classes) <= LABELLED_CLASSES:  # names at each class's median point
        for k, name in enumerate(classes):
            mx, my = np.median(xy[cls == k], axis=0)
            ax.annotate(name, (mx, my), xytext=(0, 7), textcoords="offset points",
                        fontsize=6, ha="center", va="bottom",  # above the cluster, not on it
                        bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": colours[k],
                              "alpha": 0.6, "lw": 0.8})
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{title}, {len(classes)} classes", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _thumbnails(c, rows, options: MapOptions) -> list[str | None]:
    """Thumbnails of an evenly spread subset of the rows (--thumbnails of them)."""
    from featurize.data.images import source_path
    root = c.attrs.get("dataset_root", "")
    thumbs = [None] * len(rows)
    if options.thumbnails:
        step = max(1, int(np.ceil(len(rows) / options.thumbnails)))
        for k in range(0, len(rows), step):
            thumbs[k] = thumbnail_uri(source_path(root, c.paths[rows[k]]))
    return thumbs


def _html(points, thumbs, title: str, method: str) -> str:
    import jinja2
    xy = points["xy"]
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    # x keeps 70 px each side free: class names are centred on their cluster
    svg_xy = (xy - lo) / np.maximum(hi - lo, 1e-12) * [660, 760] + [70, 30]
    svg_xy[:, 1] = 820 - svg_xy[:, 1]  # SVG's y grows downwards
    dots = [{"x": f"{x:.1f}", "y": f"{y:.1f}", "c": points["colours"][k],
             "p": f"{path} ({points['classes'][k]})", "t": t or ""}
            for (x, y), k, path, t in zip(svg_xy, points["class"], points["paths"], thumbs)]
    names = []  # class names above each class's median point, as on the PNG
    if len(points["classes"]) <= LABELLED_CLASSES:
        for k, name in enumerate(points["classes"]):
            mx, my = np.median(svg_xy[points["class"] == k], axis=0)
            names.append({"x": f"{mx:.1f}", "y": f"{my - 7:.1f}", "name": name})
    env = jinja2.Environment(autoescape=True)
    first = next((t for t in thumbs if t), BLANK_GIF)
    legend = list(zip(points["classes"], points["colours"]))
    return env.from_string(MAP_TEMPLATE).render(title=title, dots=dots, first=first,
                                                legend=legend, method=method, names=names)


def _write_atomic(path: Path, data: bytes) -> None:
    try:
        atomic.write_bytes(path, data)
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror or e}); choose another --out.") from None


MAP_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
<style>
body{font-family:system-ui,sans-serif;margin:16px;color:#222;background:#fff}
#wrap{display:flex;gap:16px;align-items:flex-start}
svg{border:1px solid #ccc;background:#fafafa;width:800px;height:820px;flex:none}
circle{stroke:none;opacity:.85} circle:hover{stroke:#000;stroke-width:2;opacity:1}
text{font-size:9px;text-anchor:middle;pointer-events:none;fill:#222;paint-order:stroke;
stroke:#fff;stroke-width:2.5px;stroke-opacity:.8}
#side{width:260px;font-size:13px} #hover{min-height:90px;border:1px solid #ddd;padding:6px}
#hover img{width:96px;height:96px;object-fit:contain;display:block;background:#eee}
#hover span{word-break:break-all}
.sw{display:inline-block;width:10px;height:10px;margin-right:4px;border-radius:50%}
#legend{max-height:560px;overflow:auto;font-size:11px;columns:2;column-gap:8px}
#legend div{white-space:nowrap;overflow:hidden;text-overflow:ellipsis;break-inside:avoid}
</style></head><body>
<h1 style="font-size:18px">{{ title }}</h1>
<p>Each dot is one cached image, coloured by class; hover over a dot for its path and
thumbnail (thumbnails are inlined for a spread subset). Method: {{ method }}.</p>
<div id="wrap"><svg viewBox="0 0 800 820" xmlns="http://www.w3.org/2000/svg">
{% for d in dots %}<circle cx="{{ d.x }}" cy="{{ d.y }}" r="3.5" fill="{{ d.c }}" data-p="{{ d.p }}"{% if d.t %} data-t="{{ d.t }}"{% endif %}><title>{{ d.p }}</title></circle>
{% endfor %}{% for n in names %}<text x="{{ n.x }}" y="{{ n.y }}">{{ n.name }}</text>
{% endfor %}</svg>
<div id="side"><div id="hover"><img id="thumb" src="{{ first }}" alt="thumbnail"><span id="path">hover over a dot</span></div>
<h2 style="font-size:14px">{{ legend|length }} classes</h2>
<div id="legend">{% for name, colour in legend %}<div><span class="sw" style="background:{{ colour }}"></span>{{ name }}</div>{% endfor %}</div>
</div></div>
<script>
document.querySelectorAll("circle").forEach(function (c) {
  c.addEventListener("mouseenter", function () {
    if (c.dataset.t) { document.getElementById("thumb").src = c.dataset.t; }
    document.getElementById("path").textContent = c.dataset.p;
  });
});
</script></body></html>
"""


