"""The embedding cache: an index file plus immutable shard files, in HDF5.

One cache per (dataset, embedding settings). The file users open, `CACHE.h5` (schema 2), is a
small index; the rows live in shard files in the folder beside it, `CACHE.h5.shards/`:

    embeddings      (N, D) float32      virtual datasets over the shards' own: h5py.File(CACHE)
    paths           (N,)   UTF-8        ["embeddings"] reads every row. Paths are relative to
    sizes, mtimes   (N,)   int64        the dataset root; size and mtime (ns) when embedded;
    digests         (N,)   UTF-8        BLAKE2b-128 of the file (hex) with --check content
    labels          (N,)   int32        index into `classes`, -1 when unlabelled (in the index:
    classes         (C,)   UTF-8        relabelling never touches a shard)
    failed/paths, failed/reasons, failed/sizes, failed/mtimes   images that could not be used
    info/<name>     (N,)   int8         row-info columns the extractor declares, virtual too:
                                        info/face, how the face was found (featurize.models.align:
                                        0 HOG, 1 HOG upsampled, 2 CNN, 3 fixed box; -1 not
                                        recorded). Absent in caches made before them.
    shards/names    (S,)   UTF-8        shard files, relative to the index's folder
    shards/runs     (K, 3) int64        (shard, start, stop): the rows of the cache in order
    shards/retired  (R,)   UTF-8        shards the previous index listed; deleted next commit
    attrs: schema_version, settings (JSON), settings_key, backbone, weights, weights_file,
           layer, pooling, input_size, crop, flip, preprocessing, precision, jitter, resize,
           align,
           dataset_root, dataset_name, embedding_dim, keras_version, backend, updated,
           complete (False when the run that wrote it was interrupted), pending (images of
           the dataset neither embedded nor failed)

Rows are in shard order, each shard sorted by path: a path's embedding never depends on the
order or timing of the work. Numeric datasets carry fletcher32 checksums: bit rot is a clear
error when read, `featurize verify` names the damaged rows, the next featurize run re-embeds
them. Schema 1 caches (one file holding every row) are read as they are and migrated, without
copying, by the next featurize run.

Guarantees: shards are written once and renamed into place when complete; the index is written
beside the old one and renamed over it, so a reader or a crash sees either the old or the new
cache. A killed run loses at most the shard it was writing; the next run folds in the complete
ones. `<file>.lock` keeps two runs apart (an flock, released by the kernel however its process
ends). Modules: schema (naming, reading), shards (shard files), index (State, commit,
compact), lock.
"""

from featurize.cache.index import SMALL_BYTES, State, commit, compact, labels_digest
from featurize.cache.lock import lock
from featurize.cache.schema import (
                                    CHECKS,
                                    DEFAULT_DIR,
                                    REQUIRED,
                                    SCHEMA_VERSION,
                                    SETTINGS_ATTRS,
                                    Cache,
                                    damage_message,
                                    default_path,
                                    file_digest,
                                    is_sharded,
                                    newest,
                                    path_for,
                                    read,
                                    read_attrs,
)
from featurize.cache.shards import Journal, ShardRows, shards_dir, write_shard

__all__ = ["CHECKS", "DEFAULT_DIR", "REQUIRED", "SCHEMA_VERSION", "SETTINGS_ATTRS", "SMALL_BYTES",
           "Cache", "Journal", "ShardRows", "State", "commit", "compact", "damage_message",
           "default_path", "file_digest", "is_sharded", "labels_digest", "lock",
           "newest", "path_for", "read", "read_attrs", "shards_dir", "write_shard"]
