"""The index: the small file users open, describing the whole cache, swapped in atomically.

A commit never copies existing rows: it lists the live rows of each shard (runs of rows, so
rows of deleted or changed files are masked, not rewritten), writes a new index beside the old
one and renames it into place. Small shards are merged as they accumulate (the cost of a merge
is bounded by SMALL_BYTES per shard, never by the cache's size); `compact` merges on request.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import time
from dataclasses import fields, replace
from operator import attrgetter
from pathlib import Path

import h5py
import numpy as np

from featurize import atomic
from featurize.cache.schema import (
    _CARRIED,
    _SHARD_FILE,
    _STR,
    CHECKS,
    SCHEMA_VERSION,
    SETTINGS_ATTRS,
    _check_file_target,
    _open,
    _strings,
    file_digest,
    is_sharded,
    read_attrs,
    shard_file,
    shard_table,
)
from featurize.cache.shards import (
    Source,
    _read_failed,
    embeddings_dataset,
    new_name,
    numbers,
    read_source,
    shards_dir,
    write_failed,
    write_merged,
)
from featurize.errors import UserError

SMALL_BYTES = 16 << 20  # shards with fewer live bytes are merged once two of them exist
MASKED = 0.5  # `compact` rewrites a shard once more than this fraction of it is masked
SCAN_BYTES = 1 << 30  # a run re-checks every embedding's checksum in caches up to this size
Entry = tuple  # (Source, positions of the rows kept, their labels): a shard's part of an index
_VIRTUAL = {"embeddings": np.float32, "paths": _STR, "sizes": np.int64, "mtimes": np.int64,
            "digests": _STR}  # the index's views of its shards' datasets


class State:
    """What is already embedded for a cache path: the rows its index lists, plus shards that
    are complete but not committed yet (a killed run's progress, Ray workers' output).

    check="content" also compares a hash of each file's content with the one recorded when
    it was embedded (rows recorded without one are embedded again), and re-checks every
    embedding's checksum whatever the cache's size.
    """

    def __init__(self, path: Path, settings, option: str = "--out", check: str = "mtime"):
        if check not in CHECKS:
            raise UserError(f"--check must be {' or '.join(CHECKS)}, not {check!r}.")
        self.path, self.settings, self.check = Path(path), settings, check
        self.sources: list[Source] = []
        self.attrs: dict = {}
        self.retired: list[str] = []  # shards the index keeps for readers of the one before
        self.legacy = False  # a schema-1 file: all rows inside, migrated by the next commit
        self._digests: dict[str, str] = {}
        _check_file_target(self.path, option)
        if self.path.exists():
            self.attrs = read_attrs(self.path, option)
            if self.attrs.get("settings_key") != settings.key():
                raise UserError(_settings_mismatch(self.path, self.attrs, settings))
            if is_sharded(self.attrs):
                self._read_index(option)
            else:
                self.legacy = True
                self.sources.append(self._legacy_source())
        self.sources += self._unlisted_shards()
        self._rows: dict[str, tuple[int, int]] | None = None  # made when first needed
        self._failed: dict[str, tuple[str, tuple[int, int]]] = {}
        self._all_current = False  # todo() found every row current, in the items' order

    def _read_index(self, option: str):
        with _open(self.path, option) as f:
            names, runs = shard_table(f, self.path)  # every name checked, as by _open
            self.retired = _strings(f["shards/retired"]) if "shards/retired" in f else []
            for name in self.retired:
                shard_file(self.path, name)
            failed, bad = _read_failed(f)
            dim = f["embeddings"].shape[1]
        live: dict[int, list[tuple[int, int]]] = {}
        for s, start, stop in runs.tolist():
            live.setdefault(s, []).append((start, stop))
        live_bytes = int((runs[:, 2] - runs[:, 1]).sum()) * dim * 4
        scan = self.check == "content" or live_bytes <= SCAN_BYTES
        for s, spans in live.items():
            file = shard_file(self.path, names[s])
            try:
                src = read_source(file, names[s], spans, scan, False)
            except OSError:  # gone or unreadable: its rows are embedded again
                src = Source(file, names[s], [], [], [], [], [], {}, damaged=True)
            self.sources.append(replace(src, listed=True))
        self.sources.append(Source(self.path, "", [], [], [], [], [], failed, damaged=bad,
                                   listed=True))

    def _legacy_source(self) -> Source:
        try:
            return replace(read_source(self.path, self.path.name), listed=True)
        except OSError as e:  # paths or reasons unreadable: nothing in it can be matched
            raise UserError(f"cache {self.path} is damaged beyond repair ({e}); move it aside "
                            "and run featurize again.") from None

    def _unlisted_shards(self) -> list[Source]:
        """Complete shards the index does not list: newer than it, applied in write order."""
        folder = shards_dir(self.path)
        listed = {s.name for s in self.sources} | set(self.retired)
        found = []
        for file in folder.glob("*.h5"):
            name = f"{folder.name}/{file.name}"
            if name in listed or not _SHARD_FILE.fullmatch(file.name) or file.is_symlink() \
                    or not file.is_file():
                continue  # not a file featurize writes: never read nor removed
            try:
                with h5py.File(file, "r") as f:
                    mine = f.attrs.get("settings_key") == self.settings.key()
                if mine:
                    found.append(read_source(file, name))
            except (OSError, KeyError):
                file.unlink()  # shards are renamed into place only once complete: never here
        return sorted(found, key=lambda s: (s.seq, s.name))

    @property
    def rows(self) -> dict[str, tuple[int, int]]:
        """key -> (source, position) of the newest row of each path."""
        if self._rows is None:
            self._index_rows()
        return self._rows

    @property
    def failed(self) -> dict[str, tuple[str, tuple[int, int]]]:
        """key -> (reason, fingerprint) of the images that could not be used."""
        if self._rows is None:
            self._index_rows()
        return self._failed

    def _index_rows(self):
        rows: dict[str, tuple[int, int]] = {}
        failed = self._failed
        for s, src in enumerate(self.sources):
            if failed:
                for key in src.keys:
                    failed.pop(key, None)
            rows.update(zip(src.keys, zip(itertools.repeat(s), range(len(src.keys)))))
            for key, value in src.failed.items():
                failed[key] = value
                rows.pop(key, None)
        self._rows = rows

    def fingerprint(self, key: str) -> tuple[int, int] | None:
        """(size, mtime) of the row of `key` when it was embedded; None without a row."""
        done = self.rows.get(key)
        if done is None:
            return None
        src = self.sources[done[0]]
        return (src.sizes[done[1]], src.mtimes[done[1]])

    def has_row(self, item) -> bool:
        """Whether a row embedded from `item` as it is now exists."""
        return self.fingerprint(item.key) == item.fingerprint

    @property
    def damaged_rows(self) -> int:
        """Rows that failed their checksum (bit rot); they are embedded again."""
        return sum(src.dropped for src in self.sources)

    def digest(self, item) -> str:
        if item.key not in self._digests:
            self._digests[item.key] = file_digest(item.path)
        return self._digests[item.key]

    def todo(self, items) -> list:
        """Items that are new or changed since they were embedded (or failed); with
        check="content" they carry the digest of their content, to be recorded."""
        aligned = self._todo_aligned(items)
        if aligned is not None:
            return aligned
        rows, sources, content = self.rows, self.sources, self.check == "content"
        out = []
        for it in items:  # the hot loop of a cache hit: a million items take about a second
            done = rows.get(it.key)
            if done is not None:
                src, i = sources[done[0]], done[1]
                if src.sizes[i] == it.size and src.mtimes[i] == it.mtime_ns and (
                        not content or "" != src.digest_list()[i] == self.digest(it)):
                    continue
            elif self.failed:
                failed = self.failed.get(it.key)
                if failed is not None and failed[1] == it.fingerprint:
                    continue
            # Hashed before decoding: a change after this point shows in the next run.
            out.append(replace(it, digest=self.digest(it)) if content else it)
        return out

    def _todo_aligned(self, items) -> list | None:
        """The common re-run, fast: the cache's rows are exactly the items' paths in the same
        order (one shard, or shards of consecutive paths) and none failed. Compared as whole
        lists; None when they do not line up (the general path decides)."""
        sources = [src for src in self.sources if src.keys or src.failed]
        if self.check == "content" or any(src.failed for src in sources):
            return None
        if sum(len(src.keys) for src in sources) != len(items):
            return None
        if [it.key for it in items] != list(itertools.chain.from_iterable(
                src.keys for src in sources)):
            return None
        sizes = itertools.chain.from_iterable(src.sizes for src in sources)
        mtimes = itertools.chain.from_iterable(src.mtimes for src in sources)
        changed = [it for it, size, mtime in zip(items, sizes, mtimes)
                   if it.size != size or it.mtime_ns != mtime]
        self._all_current = not changed
        return changed

    def up_to_date(self, dataset) -> bool:
        """Given nothing to embed (`todo` is empty), whether there is nothing to mask,
        relabel, repair or fold in either: then the index can stay as it is."""
        if not self.path.exists() or self.legacy:
            return False
        if any(not src.listed or src.damaged for src in self.sources):
            return False
        covered = self._all_current or len(dataset.items) == len(self.rows) + len(self.failed)
        return (covered
                and self.attrs.get("labels_digest") == labels_digest(dataset)
                and bool(self.attrs.get("complete", True)))

    def live(self, items, classes) -> list[Entry]:
        """The rows to keep, by source: the newest row of each of `items` as the file is now,
        labelled by its index in `classes`. Sources without such rows are left out."""
        keep: list[dict[int, int]] = [{} for _ in self.sources]
        class_index = {c: i for i, c in enumerate(classes)}
        rows, sources = self.rows, self.sources
        for it in items:
            done = rows.get(it.key)
            if done is not None:
                src, i = sources[done[0]], done[1]
                if src.sizes[i] == it.size and src.mtimes[i] == it.mtime_ns:
                    keep[done[0]][i] = class_index.get(it.label, -1)
        entries = []
        for src, labelled in zip(sources, keep):
            if labelled:
                positions = sorted(labelled)  # the file's order
                entries.append((src, positions, [labelled[i] for i in positions]))
        return entries

    def failures(self, items) -> list[tuple[str, str, tuple[int, int]]]:
        """(key, reason, fingerprint) of the recorded failures of `items` as they are now."""
        if not self.failed:
            return []
        failed = self.failed
        return sorted((it.key, failed[it.key][0], it.fingerprint) for it in items
                      if it.key in failed and failed[it.key][1] == it.fingerprint)


def _settings_mismatch(path, attrs, settings) -> str:
    # a setting added since the cache was made (e.g. align) had its default value then
    defaults = {f.name: f.default for f in fields(settings)}
    recorded = {k: attrs.get(k, defaults.get(k)) for k in SETTINGS_ATTRS}
    diff = [f"{k}={recorded[k]!r} (asked {getattr(settings, k)!r})" for k in SETTINGS_ATTRS
            if str(recorded[k]) != str(getattr(settings, k))]
    return (f"{path} holds embeddings made with other settings ({'; '.join(diff) or 'unknown'}); "
            "drop --out to get a file of its own, or choose another --out.")


def labels_digest(dataset) -> str:
    """A hash of the classes and of every (path, label): relabelling shows as a new value."""
    items = dataset.items
    h = hashlib.sha256(json.dumps(dataset.classes).encode("utf-8", "surrogateescape"))
    h.update("\0".join(map(attrgetter("key"), items)).encode("utf-8", "surrogateescape"))
    h.update(json.dumps(list(map(attrgetter("label"), items))).encode())  # None: null
    return h.hexdigest()[:16]


# --- committing ------------------------------------------------------------------------------

def commit(path: Path, settings, dataset, provenance: dict, dim: int | None = None,
           complete: bool = True) -> dict:
    """Make the index describe `dataset`: the newest row of every current file, from the old
    index and the shards written since; failures recorded; then swap it in.

    No row is copied, except when small shards are merged. Rows of files that are gone or
    changed are masked. `complete` False (an interrupted run) is recorded, with the number
    of images still pending. Returns the row and failure counts, and notes for the user.
    """
    path = Path(path)
    state = State(path, settings)
    if path.exists():  # a run that embedded nothing keeps the versions that made the rows
        provenance = {**{k: state.attrs[k] for k in _CARRIED if k in state.attrs}, **provenance}
    keep = state.live(dataset.items, dataset.classes)
    failed = state.failures(dataset.items)
    rows = sum(len(pos) for _, pos, _ in keep)
    attrs = {**dataset_attrs(settings, dataset), **provenance, "complete": bool(complete),
             "pending": len(dataset.items) - rows - len(failed)}
    notes = []
    path.parent.mkdir(parents=True, exist_ok=True)
    if state.legacy:
        keep = _migrate(path, keep)
        notes.append(f"{path} now has the sharded layout of cache schema {SCHEMA_VERSION}: its "
                     f"rows moved, unchanged, into {shards_dir(path)}/ (nothing was embedded "
                     "again); versions of featurize before it cannot read it.")
    keep = _merge_small(path, settings, keep, explicit=False)
    write_index(path, state, keep, (failed, dataset.classes), attrs, dim)
    _remove_unused(path, state, keep, journal=True)
    notes += _masked_note(path, keep)
    return {"rows": rows, "failed": len(failed), "notes": notes}


def _migrate(path: Path, keep):
    """A schema-1 file becomes the first shard of its own index: linked (or copied) into the
    shards folder, so readers of the old file keep it until they close it."""
    folder = shards_dir(path)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{new_name('migrated')}.h5"
    with h5py.File(path, "r") as f:
        has_digests = "digests" in f
    try:
        if not has_digests:
            raise OSError("needs a digests dataset: copy it")
        os.link(path, target)
    except OSError:
        tmp = folder / f".{target.name}.tmp-{os.getpid()}"
        shutil.copyfile(path, tmp)
        if not has_digests:
            with h5py.File(tmp, "r+") as f:
                n = f["paths"].shape[0]
                f.create_dataset("digests", data=[""] * n, dtype=_STR)
        atomic.replace(tmp, target)
    name = f"{folder.name}/{target.name}"
    return [(replace(src, path=target, name=name) if src.path == path else src, pos, labels)
            for src, pos, labels in keep]


def _merge_small(path: Path, settings, keep, explicit: bool, everything: bool = False):
    """Merge small shards (and, when `explicit`, mostly masked ones) into one, sorted by path;
    the merged shard takes the place of the first of them."""
    def candidate(src, pos):
        small = len(pos) * src.dim * 4 < SMALL_BYTES
        return everything or small or (explicit and len(pos) < MASKED * src.file_rows)
    chosen = [k for k, (src, pos, _) in enumerate(keep) if candidate(src, pos)]
    masked = any(len(keep[k][1]) < keep[k][0].file_rows for k in chosen)
    if len(chosen) < 2 and not (explicit and chosen and masked):
        return keep
    members = [keep[k] for k in chosen]
    dim = next((src.dim for src, _, _ in members if src.dim), 0)
    file, _ = write_merged(path, settings, [(src, pos) for src, pos, _ in members], dim)
    name = f"{file.parent.name}/{file.name}"
    merged = replace(read_source(file, name, scan=False, failures=False), listed=True)
    label_of = {src.keys[i]: label for src, pos, labels in members
                for i, label in zip(pos, labels)}
    out = [entry for k, entry in enumerate(keep) if k not in chosen]
    out.insert(sum(1 for k in range(chosen[0]) if k not in chosen),
               (merged, list(range(len(merged.keys))), [label_of[k] for k in merged.keys]))
    return out


def write_index(path: Path, state: State, keep: list[Entry], labelling, attrs: dict,
                dim: int | None):
    """Write the index for the rows `keep` beside `path`, then rename it into place.
    `labelling`: (failures, classes)."""
    failed, classes = labelling
    names, runs, labels = [], [], []
    for src, pos, entry_labels in keep:
        s = len(names)
        names.append(src.name)
        runs += [(s, start, stop) for start, stop in _runs([src.rows[i] for i in pos])]
        labels += entry_labels
    dim = next((src.dim for src, _, _ in keep if src.dim), dim or 0)
    retired = sorted({s.name for s in state.sources  # not a migrated schema-1 file: the index
                      if s.listed and s.name and Path(s.path) != path} - set(names))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as f:
            g = f.create_group("shards")
            g.create_dataset("names", data=names, dtype=_STR)
            g.create_dataset("runs", data=np.asarray(runs, np.int64).reshape(-1, 3))
            g.create_dataset("retired", data=retired, dtype=_STR)
            _views(f, [src.file_rows for src, _, _ in keep], names, runs, dim)
            _info_views(f, [src.info_names for src, _, _ in keep], [src.file_rows for src, _, _
                                                                     in keep], names, runs)
            numbers(f, "labels", labels, np.int32)
            f.create_dataset("classes", data=list(classes), dtype=_STR)
            write_failed(f, failed)
            f.attrs.update({**attrs, "embedding_dim": dim})
        atomic.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write cache {path} ({e.strerror or e}); free some space or "
                        "choose another --out. The previous cache and the progress since are "
                        "intact.") from None
    except BaseException:  # interrupted mid-write: the previous index stays, whole
        tmp.unlink(missing_ok=True)
        raise


def _runs(rows: list[int]) -> list[tuple[int, int]]:
    """Increasing row numbers as (start, stop) runs of consecutive rows."""
    if not rows:
        return []
    a = np.asarray(rows)
    breaks = np.flatnonzero(np.diff(a) != 1) + 1
    starts, ends = np.r_[0, breaks], np.r_[breaks, len(a)]
    return [(int(a[s]), int(a[e - 1]) + 1) for s, e in zip(starts, ends)]


def _views(f, file_rows, names, runs, dim: int):
    """The index's `embeddings`, `paths`, `sizes`, `mtimes`, `digests`: virtual datasets
    over the shards' own, so h5py.File(cache)["embeddings"] reads the cache's rows."""
    n = sum(stop - start for _, start, stop in runs)
    for name, dtype in _VIRTUAL.items():
        shape = (n, dim) if name == "embeddings" else (n,)
        if n == 0:  # h5py makes no virtual dataset of no rows
            if name == "embeddings":
                embeddings_dataset(f, 0, dim)
            else:
                f.create_dataset(name, shape=(0,), dtype=dtype)
            continue
        layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
        offset = 0
        for s, start, stop in runs:
            source_shape = (file_rows[s], dim) if name == "embeddings" else (file_rows[s],)
            layout[offset:offset + stop - start] = h5py.VirtualSource(
                names[s], name, shape=source_shape)[start:stop]
            offset += stop - start
        f.create_virtual_dataset(name, layout, fillvalue=np.nan if name == "embeddings" else None)


def _info_views(f, info_names, file_rows, names, runs):
    """`info/<name>`: the row-info columns, virtual like `paths`; rows of shards without the
    column (written before it existed) read as -1."""
    n = sum(stop - start for _, start, stop in runs)
    for column in sorted({c for shard in info_names for c in shard}):
        if n == 0:
            continue
        layout = h5py.VirtualLayout(shape=(n,), dtype=np.int8)
        offset = 0
        for s, start, stop in runs:
            if column in info_names[s]:
                layout[offset:offset + stop - start] = h5py.VirtualSource(
                    names[s], f"info/{column}", shape=(file_rows[s],))[start:stop]
            offset += stop - start
        f.require_group("info").create_virtual_dataset(column, layout, fillvalue=-1)


def _remove_unused(path: Path, state: State, keep, journal: bool):
    """After the swap: delete the shards the previous index had retired and, with `journal`,
    uncommitted shards whose rows are now elsewhere. Shards the previous index listed and this
    one does not are kept one more commit, for readers still holding the previous index."""
    names = {src.name for src, _, _ in keep}
    doomed = set(state.retired)
    if journal:
        doomed |= {s.name for s in state.sources if not s.listed and s.name not in names}
    for name in sorted(doomed):
        file = shard_file(path, name, remove=True)  # None: not in this cache's own folder
        if file is not None:
            file.unlink(missing_ok=True)


def _masked_note(path: Path, keep) -> list[str]:
    total = sum(src.file_rows * src.dim * 4 for src, _, _ in keep)
    masked = sum((src.file_rows - len(pos)) * src.dim * 4 for src, pos, _ in keep)
    if masked <= SMALL_BYTES or masked * 4 <= total:
        return []
    return [f"{masked / 2**20:.0f} MB of {path}'s shards hold rows of files since deleted or "
            f"changed; python -m featurize compact {path} reclaims them."]


def dataset_attrs(settings, dataset) -> dict:
    attrs = {"schema_version": SCHEMA_VERSION, "settings": settings.to_json(),
             "settings_key": settings.key()}
    attrs.update({k: getattr(settings, k) for k in SETTINGS_ATTRS})
    attrs.update(dataset_root=str(dataset.root), dataset_name=dataset.name,
                 labels_digest=labels_digest(dataset),
                 updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    return attrs


# --- compacting ------------------------------------------------------------------------------

def compact(path, everything: bool = False) -> dict:
    """Merge the small and the mostly masked shards of a cache (all of them with
    `everything`) into one, with the same atomic swap as a commit. Takes the cache's lock."""
    from featurize.cache.lock import lock
    from featurize.settings import EmbeddingSettings
    path = Path(path)
    attrs = read_attrs(path, "CACHE")
    settings = EmbeddingSettings.from_json(attrs["settings"])
    with lock(path, "CACHE"):
        state = State(path, settings, option="CACHE")
        with _open(path, "CACHE") as f:
            labels = dict(zip(_strings(f["paths"]), f["labels"][()].tolist()))
            classes = _strings(f["classes"])
        keep = [(src, list(range(len(src.keys))), [labels.get(k, -1) for k in src.keys])
                for src in state.sources if src.listed and src.keys]
        before = len(keep)
        if state.legacy:
            keep = _migrate(path, keep)
        keep = _merge_small(path, settings, keep, explicit=True, everything=everything)
        failed = sorted((k, r, fp) for src in state.sources if src.listed
                        for k, (r, fp) in src.failed.items())
        write_index(path, state, keep, (failed, classes),
                    {**_attrs_of(state), "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
                    None)
        _remove_unused(path, state, keep, journal=False)
    return {"shards_before": before, "shards_after": len(keep),
            "rows": sum(len(pos) for _, pos, _ in keep)}


def _attrs_of(state: State) -> dict:
    attrs = dict(state.attrs)
    attrs["schema_version"] = SCHEMA_VERSION
    return attrs
