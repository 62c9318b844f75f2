"""scikit-learn conventions (issue #12, item 2): every head passes scikit-learn's own
`check_estimator`; the dense head is deterministic without touching global random state;
`EmbeddingTransformer` embeds image paths like the cache does, inside Pipelines and
GridSearchCV, reusing a cache and pickling without its model."""

import pickle
import random
import textwrap
from pathlib import Path

import joblib
import numpy as np
import pytest
from sklearn.utils.estimator_checks import parametrize_with_checks

from classify._heads import CosineCentroid, CosineKNN, DenseHead
from conftest import blobs, make_folder, run_python, same, write_image
from featurize import cache
from featurize.errors import UserError
from featurize.estimators import EmbeddingTransformer

TINY_MODEL = dict(backbone="vggface-vgg16", weights="none", input_size=32)


# --- the heads ------------------------------------------------------------------------------

# DenseHead(epochs=3): the suite fits it about 50 times, Keras traces each fit (~1 s); three
# epochs already pass its accuracy check.
@parametrize_with_checks([CosineCentroid(), CosineKNN(), DenseHead(epochs=3)])
def test_heads_pass_check_estimator(estimator, check):
    check(estimator)


def _numpy_state_equal(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b))


def test_dense_head_is_deterministic_without_global_random_state():
    X, y, _ = blobs(n_classes=4, per_class=20, dim=16, spread=1.0)
    random.seed(1)
    np.random.seed(2)
    python_state, numpy_state = random.getstate(), np.random.get_state()
    first = DenseHead(epochs=5).fit(X, y).predict_proba(X)
    assert random.getstate() == python_state  # was reseeded by keras.utils.set_random_seed
    assert _numpy_state_equal(np.random.get_state(), numpy_state)
    random.random(), np.random.random()  # a caller using its generators meanwhile...
    again = DenseHead(epochs=5).fit(X, y).predict_proba(X)
    np.testing.assert_array_equal(first, again)  # ...changes nothing
    other = DenseHead(epochs=5, seed=1).fit(X, y).predict_proba(X)
    assert np.abs(first - other).max() > 1e-4  # the seed is what decides


def test_dense_head_fits_one_row_and_one_class():
    one = DenseHead(epochs=2).fit([[0.5, 1.0]], ["solo"])
    assert one.predict([[0.0, 0.0], [3.0, 1.0]]).tolist() == ["solo", "solo"]
    X, y, _ = blobs(n_classes=2, per_class=2, dim=3)
    assert DenseHead(epochs=2).fit(X, y).predict(X).shape == (4,)


def test_dense_head_survives_joblib(tmp_path):
    X, y, _ = blobs(n_classes=3, per_class=15, dim=8)
    head = DenseHead(epochs=10).fit(X, np.array(["a", "b", "c"])[y])
    joblib.dump(head, tmp_path / "head.joblib")
    loaded = joblib.load(tmp_path / "head.joblib")
    np.testing.assert_allclose(loaded.predict_proba(X), head.predict_proba(X), rtol=1e-6)
    assert loaded.predict(X).tolist() == head.predict(X).tolist()
    assert loaded.n_features_in_ == 8 and loaded.get_params() == head.get_params()


def test_centroid_two_classes_follows_the_binary_convention():
    X, y, _ = blobs(n_classes=2, per_class=10, dim=5)
    head = CosineCentroid().fit(X, y)
    decision = head.decision_function(X)
    assert decision.shape == (20,)
    assert head.predict(X).tolist() == head.classes_[(decision > 0).astype(int)].tolist()
    assert head.class_distances(X).shape == (20, 2)  # predict's distances keep a column per class


# --- EmbeddingTransformer -------------------------------------------------------------------

def _paths_and_labels(root: Path):
    paths = sorted(str(p) for p in root.rglob("*.jpg"))
    return paths, [Path(p).parent.name for p in paths]


def _featurize_cache(folder: Path, out: Path) -> Path:
    from featurize.jobs.run import featurize
    return featurize(folder, cache_dir=out, progress=False, **TINY_MODEL).path


def test_transform_equals_the_featurize_cache(image_folder, tmp_path):
    path = _featurize_cache(image_folder, tmp_path / "c")
    c = cache.read(path)
    paths = [str(image_folder / key) for key in c.paths][::-1]  # any order: X's is kept
    X = EmbeddingTransformer(**TINY_MODEL).fit_transform(paths)
    assert X.dtype == np.float32 and X.shape == c.embeddings.shape
    np.testing.assert_allclose(X, c.embeddings[::-1], rtol=same(), atol=1e-6)


class _Spy:
    """Records the images the transformer decodes and embeds, and whether it built a model."""

    def __init__(self, monkeypatch):
        import featurize.estimators as est
        self.embedded, self.built = [], 0
        real_batches, real_build = est.batches, est.build_extractor

        def batches(items, *args, **kwargs):
            self.embedded += [it.path for it in items]
            return real_batches(items, *args, **kwargs)

        def build(*args):
            self.built += 1
            return real_build(*args)
        monkeypatch.setattr(est, "batches", batches)
        monkeypatch.setattr(est, "build_extractor", build)


def test_cache_rows_are_reused_and_changed_files_embedded(image_folder, tmp_path, monkeypatch):
    path = _featurize_cache(image_folder, tmp_path / "c")
    paths, _ = _paths_and_labels(image_folder)
    spy = _Spy(monkeypatch)
    reference = EmbeddingTransformer(**TINY_MODEL).fit_transform(paths)
    spy.embedded, spy.built = [], 0

    transformer = EmbeddingTransformer(**TINY_MODEL, cache=path).fit(paths)
    np.testing.assert_allclose(transformer.transform(paths), reference, rtol=same(), atol=1e-6)
    assert spy.embedded == [] and spy.built == 0  # a full hit builds no model

    new = str(write_image(tmp_path / "elsewhere" / "new.jpg", seed=7))
    changed = paths[3]
    write_image(Path(changed), seed=999)  # other pixels, another size or mtime
    X = transformer.transform([new, *paths, new])
    assert sorted(spy.embedded) == sorted([new, changed]) and spy.built == 1  # each file once
    fresh = EmbeddingTransformer(**TINY_MODEL).fit_transform([new, changed])
    np.testing.assert_allclose(X[[0, 4, 13]], fresh[[0, 1, 0]], rtol=same(), atol=1e-6)
    unchanged = [i + 1 for i in range(len(paths)) if i != 3]
    np.testing.assert_array_equal(X[unchanged], transformer.transform(
        [p for i, p in enumerate(paths) if i != 3]))


def test_cache_made_with_other_settings_is_refused_at_fit(image_folder, tmp_path):
    path = _featurize_cache(image_folder, tmp_path / "c")
    with pytest.raises(UserError, match=r"cache .* other embedding settings .*input_size=32 "
                                        r"\(here 48\)"):
        EmbeddingTransformer(**{**TINY_MODEL, "input_size": 48}, cache=path).fit()
    with pytest.raises(UserError, match="missing.h5"):
        EmbeddingTransformer(**TINY_MODEL, cache=tmp_path / "missing.h5").fit()


def test_images_that_cannot_be_embedded_are_named(image_folder, tmp_path, monkeypatch):
    paths, _ = _paths_and_labels(image_folder)
    transformer = EmbeddingTransformer(**TINY_MODEL).fit()
    spy = _Spy(monkeypatch)
    with pytest.raises(UserError, match=r"1 image file\(s\) of X do not exist .*nowhere\.jpg"):
        transformer.transform([paths[0], str(tmp_path / "nowhere.jpg")])
    assert spy.built == 0  # told before building a model
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(Path(paths[0]).read_bytes()[:200])
    with pytest.raises(UserError, match=rf"1 of 2 image\(s\) could not be embedded "
                                        rf"\({broken}: corrupt"):
        transformer.transform([paths[0], str(broken)])


@pytest.mark.parametrize("X, message", [
    ("photo.jpg", "not one path"),
    ([], "no image paths"),
    ([[1, 2], [3, 4]], r"shape \(2, 2\)"),
    ([3.5], "not 3.5 of type float"),
])
def test_x_that_is_no_list_of_paths_is_a_clear_error(X, message):
    with pytest.raises(UserError, match=message):
        EmbeddingTransformer(**TINY_MODEL).fit().transform(X)


def test_parameters_are_checked_the_scikit_learn_way():
    from sklearn.exceptions import NotFittedError
    from sklearn.utils._param_validation import InvalidParameterError
    with pytest.raises(InvalidParameterError, match="'batch_size' parameter"):
        EmbeddingTransformer(**TINY_MODEL, batch_size=0).fit()
    with pytest.raises(InvalidParameterError, match="'pool' parameter"):
        EmbeddingTransformer(**TINY_MODEL, pool="mean").fit()
    with pytest.raises(UserError, match="unknown backbone|no-such-net"):
        EmbeddingTransformer("no-such-net").fit()
    with pytest.raises(NotFittedError):
        EmbeddingTransformer(**TINY_MODEL).transform(["a.jpg"])


def test_pipeline_and_grid_search_over_the_head(tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline
    folder = make_folder(tmp_path / "faces", per_class=6)
    paths, labels = _paths_and_labels(folder)
    model = make_pipeline(EmbeddingTransformer(**TINY_MODEL), LogisticRegression(max_iter=500))
    assert model.fit(paths, labels).predict(paths[:3]).tolist() == labels[:3]
    # over a cache each fold reads the rows instead of building the model again
    cached = _featurize_cache(folder, tmp_path / "c")
    model.set_params(embeddingtransformer__cache=cached)
    search = GridSearchCV(model, {"logisticregression__C": [1.0, 100.0]}, cv=2)
    search.fit(paths, labels)
    assert search.best_params_["logisticregression__C"] in (1.0, 100.0)
    assert np.isfinite(search.cv_results_["mean_test_score"]).all()
    assert search.predict(paths).tolist() == labels  # refit on all of them


def test_pickles_without_its_model_and_builds_it_again(image_folder):
    paths, _ = _paths_and_labels(image_folder)
    transformer = EmbeddingTransformer(**TINY_MODEL).fit()
    X = transformer.transform(paths)
    assert transformer.__dict__.get("_extractor") is not None
    data = pickle.dumps(transformer)
    assert len(data) < 20_000  # no weights inside (vgg16 has 15M parameters)
    copy = pickle.loads(data)
    assert "_extractor" not in copy.__dict__ and copy.get_params() == transformer.get_params()
    np.testing.assert_allclose(copy.transform(paths), X, rtol=same(), atol=1e-6)


def _api_checks():
    """scikit-learn's checks of the estimator API that do not feed numeric data."""
    from sklearn.utils import estimator_checks as checks
    names = ["check_estimator_cloneable", "check_estimator_repr", "check_no_attributes_set_in_init",
             "check_parameters_default_constructible", "check_get_params_invariance",
             "check_set_params", "check_do_not_raise_errors_in_init_or_set_params",
             "check_estimator_tags_renamed", "check_valid_tag_types", "check_mixin_order"]
    return [getattr(checks, name) for name in names]


@pytest.mark.parametrize("check", _api_checks(), ids=lambda c: c.__name__)
def test_transformer_passes_the_api_checks_that_apply(check):
    check("EmbeddingTransformer", EmbeddingTransformer())


def test_pipeline_in_a_fresh_process(tmp_path):
    folder = make_folder(tmp_path / "faces")
    script = textwrap.dedent(f"""
        import pickle, sys
        from pathlib import Path
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from featurize import EmbeddingTransformer, UserError  # the public names
        paths = sorted(str(p) for p in Path({str(folder)!r}).rglob("*.jpg"))
        labels = [Path(p).parent.name for p in paths]
        embed = EmbeddingTransformer("vggface-vgg16", weights="none", input_size=32).fit()
        assert "keras" not in sys.modules  # fit builds no model
        model = make_pipeline(embed, LogisticRegression()).fit(paths, labels)
        again = pickle.loads(pickle.dumps(model))
        assert again.predict(paths).tolist() == model.predict(paths).tolist() == labels
        print("ok", model.named_steps["embeddingtransformer"].transform(paths[:2]).shape)
        try:
            again.predict(paths[:1] + ["no.jpg"])
        except UserError as e:
            print(e)
    """)
    result = run_python(script, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[-2:] == [
        "ok (2, 512)", "1 image file(s) of X do not exist or are not files: no.jpg; fix those paths."]
