"""`python -m classify serve`: a run, and optionally a gallery cache, behind an HTTP API and a
page (FastAPI on uvicorn: the `serve` extra).

    app = classify.create_app("runs/logreg", cache="data/cache/lfw.h5")  # ASGI, to mount
    classify.serve("runs/logreg", port=8000)                           # blocks; Ctrl-C stops

Routes: POST /predict (top-k classes, the open-set verdict), POST /search (nearest gallery
rows, with a cache), POST /embed (the embeddings and the settings that made them), GET
/health, GET /info, GET / (the page), and FastAPI's /docs and /openapi.json.

How a request is served: the body is read whole, up to `max_upload_bytes` (else 413); its
images (multipart files, or JSON with base64) are checked against `max_pixels` and decoded in
worker threads by featurize's image loader, from a temporary file, exactly as `classify
predict` reads a file; the prepared arrays of concurrent requests are gathered into one model
batch (up to `max_batch` images, waiting at most `max_wait_ms` for more while other requests
are still being decoded) that one model thread runs (on an accelerator or JAX, padded to one
of a few sizes, so the model sees few shapes); the head then scores each request's rows on
that thread too. A bad image is a 422 naming it, never a 500; every error is JSON with an
`error` line.

The run folder is loaded with `Run.load` (its trust rules: nothing in it runs), and the cache
is read as `classify search` reads it. Nothing is listened on but `host` (127.0.0.1 unless
told otherwise), and with a token (the option, or FEATURIZE_SERVE_TOKEN) every route but
/health, the page and the API docs needs `Authorization: Bearer TOKEN`.
"""

import asyncio
import base64
import binascii
import functools
import hmac
import io
import ipaddress
import json
import os
import platform
import re
import secrets
import socket
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from typing import Annotated

import numpy as np

from classify import _heads as heads, _runs as runs
from featurize.data.images import MAX_PIXELS as LOADER_MAX_PIXELS, prepare_image
from featurize.errors import OptionError, UserError, check_range
from featurize.settings import installed_version

TOKEN_ENV = "FEATURIZE_SERVE_TOKEN"  # the token, when --token is not given
INSTALL_HINT = "pip install 'featurize-embeddings[serve]'"
MAX_K = 1000  # neighbours or classes per image, at most
MAX_NAME = 200  # characters of an upload's name echoed back
DECODE_THREADS = 4  # decoding threads stop scaling at about 4 (the GIL; featurize's pipeline)
DRAIN_MAX_BYTES = 256 * 1024 * 1024  # an over-limit body up to this is read, so the client
# sees the 413 instead of a reset connection; a larger one is answered at once
GRACEFUL_SECONDS = 10  # SIGTERM: requests in flight get this long to finish
THUMB_SIDE = 110  # the report's gallery thumbnails
_SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                     (b"x-frame-options", b"DENY")]


@dataclass(frozen=True)
class ServeOptions:
    """How a run is served. `host` and `port` (0: any free port) to listen on; `token`: the
    bearer token every request but /health and the page must carry (None: the
    FEATURIZE_SERVE_TOKEN environment variable, or no token); `max_batch` images per model
    batch and `max_wait_ms` the longest a batch waits for more; `max_upload_bytes` per
    request body, `max_pixels` per image, `max_images` per request; `top_k` classes and `k`
    gallery neighbours per image unless a request asks for another number."""

    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = field(default=None, repr=False)
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_upload_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_images: int = 32
    top_k: int = 5
    k: int = 10

    def __post_init__(self):
        if not isinstance(self.host, str) or not self.host.strip() or " " in self.host:
            raise OptionError("host", f"must be a host name or address (such as 127.0.0.1), "
                                      f"not {self.host!r}.")
        check_range("port", self.port, 0, 65535)
        if self.token is not None:
            _check_token("token", self.token)
        check_range("max_batch", self.max_batch, 1, 1024)
        check_range("max_wait_ms", self.max_wait_ms, 0, 1000, kind=float)
        check_range("max_upload_bytes", self.max_upload_bytes, 1)
        check_range("max_pixels", self.max_pixels, 1, LOADER_MAX_PIXELS)
        check_range("max_images", self.max_images, 1, 1024)
        check_range("top_k", self.top_k, 1, MAX_K)
        check_range("k", self.k, 1, MAX_K)

    def resolved_token(self) -> str | None:
        """The token requests must carry: the option, else $FEATURIZE_SERVE_TOKEN, else None."""
        if self.token is not None:
            return self.token
        from_env = os.environ.get(TOKEN_ENV) or None
        return _check_token(TOKEN_ENV, from_env) if from_env else None

    def public(self) -> dict:
        """The options /info shows: all but the token."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "token"}


def _check_token(name: str, token) -> str:
    if not isinstance(token, str) or not token or any(c.isspace() for c in token) \
            or not token.isprintable():
        where = name if name == TOKEN_ENV else "token"
        raise OptionError(where, "must be a non-empty string of printable characters without "
                                 "spaces (e.g. python -c 'import secrets; "
                                 "print(secrets.token_urlsafe())').")
    return token


def options_of(options: ServeOptions | None, settings: dict) -> ServeOptions:
    if options is None:
        return ServeOptions(**settings)
    if settings:
        raise TypeError("pass either options=ServeOptions(...) or its fields, not both")
    return options


# --- errors --------------------------------------------------------------------------------

class Problem(Exception):
    """A request that cannot be answered: its HTTP status, one line, and extra JSON fields."""

    def __init__(self, status: int, message: str, headers=None, **extra):
        super().__init__(message)
        self.status, self.message, self.headers, self.extra = status, message, headers, extra


def _error_response(status: int, message: str, headers=None, **extra):
    from fastapi.responses import JSONResponse
    return JSONResponse({"error": " ".join(str(message).split()), **extra}, status,
                        headers=headers)


def _install_error_handlers(app) -> None:
    """Every error is JSON with an `error` line; no traceback ever reaches a response."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    async def problem(request, e: Problem):
        return _error_response(e.status, e.message, e.headers, **e.extra)

    async def http_error(request, e: HTTPException):
        return _error_response(e.status_code, e.detail, getattr(e, "headers", None))

    async def invalid(request, e: RequestValidationError):
        said = "; ".join(f"{'.'.join(map(str, err.get('loc', ())[1:])) or 'request'}: "
                         f"{err.get('msg', 'invalid')}" for err in e.errors())
        return _error_response(422, said or "invalid request")

    async def user_error(request, e: UserError):
        return _error_response(400, str(e))

    async def unexpected(request, e: Exception):
        print("".join(traceback.format_exception(type(e), e, e.__traceback__)).rstrip(),
              file=sys.stderr, flush=True)
        return _error_response(500, f"internal error ({type(e).__name__}); see the server's "
                                    "log.")

    app.add_exception_handler(Problem, problem)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(UserError, user_error)
    app.add_exception_handler(Exception, unexpected)


class BodyLimit:
    """ASGI middleware: the request body read whole up to `limit` bytes (a larger one is a 413
    with the connection closed), then handed to the app; security headers on every response."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        send = _with_headers(send, _SECURITY_HEADERS)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"").strip()
        if declared and (not declared.isdigit() or int(declared) > self.limit):
            if (not declared.isdigit() or int(declared) > DRAIN_MAX_BYTES
                    or headers.get(b"expect", b"").lower() == b"100-continue"):
                return await self._too_large(send)  # the client has sent no body yet, or
            declared = b""  # ...it is small enough to read and drop: then answer
        chunks, total, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return
            total += len(message.get("body", b""))
            more = message.get("more_body", False)
            if total > DRAIN_MAX_BYTES:
                return await self._too_large(send)
            if total <= self.limit:
                chunks.append(message.get("body", b""))
        if total > self.limit:
            return await self._too_large(send)
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    async def _too_large(self, send):
        body = json.dumps({"error": f"the request body is over the upload limit of "
                                    f"{self.limit:,} bytes; send smaller or fewer images "
                                    "(--max-upload-bytes)."}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def _with_headers(send, extra):
    async def sending(message):
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *extra]}
        await send(message)
    return sending


def _replay(body: bytes, receive):
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: the disconnect, when the client leaves
    return replayed


# --- reading and decoding the images of a request ----------------------------------------------

async def read_images(request, options: ServeOptions) -> list[tuple[str, bytes]]:
    """(name, bytes) of each image of a request: multipart files, or JSON with base64."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        images = await _form_images(request, options)
    elif kind == "application/json" or kind.endswith("+json"):
        images = _json_images(await request.body(), options)
    else:
        raise Problem(415 if kind else 400, f"send the images as multipart/form-data files "
                      f"(curl -F image=@photo.jpg) or as JSON {{\"images\": [BASE64, ...]}}, "
                      f"not {kind or 'a body without a content type'}.")
    if not images:
        raise Problem(400, "the request holds no image; send one or more files "
                           "(curl -F image=@photo.jpg) or JSON {\"images\": [BASE64, ...]}.")
    if len(images) > options.max_images:
        raise Problem(413, f"{len(images)} images in one request, over the limit of "
                           f"{options.max_images} (--max-images); send them in several requests.")
    return images


async def _form_images(request, options: ServeOptions) -> list[tuple[str, bytes]]:
    from starlette.datastructures import UploadFile
    try:
        form = await request.form(max_files=options.max_images + 1,
                                  max_fields=options.max_images + 16)
    except Exception as e:  # a malformed body, or too many parts
        detail = getattr(e, "detail", None) or str(e) or type(e).__name__
        raise Problem(400, f"cannot read the multipart body ({detail}).") from None
    try:
        images = []
        for n, (_, value) in enumerate(form.multi_items()):
            if isinstance(value, UploadFile):
                images.append((_name(value.filename, n), await value.read()))
        return images
    finally:
        await form.close()


def _json_images(body: bytes, options: ServeOptions) -> list[tuple[str, bytes]]:
    """{"images": [BASE64 or {"name": ..., "data": BASE64}, ...]} or {"image": BASE64}."""
    shape = ('JSON {"images": [BASE64, ...]} (or items {"name": ..., "data": BASE64}, or '
             '{"image": BASE64})')
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise Problem(400, f"the body is not JSON ({e}); send {shape}.") from None
    items = doc.get("images", [doc["image"]] if "image" in doc else None) \
        if isinstance(doc, dict) else None
    if not isinstance(items, list):
        raise Problem(400, f"send {shape}.")
    if len(items) > options.max_images:
        raise Problem(413, f"{len(items)} images in one request, over the limit of "
                           f"{options.max_images} (--max-images); send them in several requests.")
    return [_json_image(item, n, shape) for n, item in enumerate(items)]


def _json_image(item, n: int, shape: str) -> tuple[str, bytes]:
    name, data = None, item
    if isinstance(item, dict):
        name, data = item.get("name"), item.get("data")
    if not isinstance(data, str):
        raise Problem(400, f"images[{n}] is not a base64 string; send {shape}.")
    if data.startswith("data:") and "," in data:  # a data: URI
        data = data.split(",", 1)[1]
    try:
        raw = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise Problem(400, f"images[{n}] is not valid base64 ({e}).") from None
    return _name(name if isinstance(name, str) else None, n), raw


def _name(given: str | None, n: int) -> str:
    text = "".join(c for c in (given or "") if c.isprintable()).strip()
    return text[:MAX_NAME] or f"image{n}"


def decode(prepare, data: bytes, max_pixels: int):
    """(the array `prepare` makes of an uploaded image, None) or (None, why it cannot be
    used). The bytes go through a private temporary file so that featurize's loader reads
    them exactly as it reads the file itself (its checks, its decoder, its resizing)."""
    if not data:
        return None, "empty file"
    reason = _pixels_problem(data, max_pixels)
    if reason:
        return None, reason
    fd, path = tempfile.mkstemp(prefix="classify-serve-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return prepare_image(prepare, path)
    except Exception as e:  # noqa: BLE001 - a crafted file must be a 422, not a 500
        return None, f"cannot be decoded ({type(e).__name__})"
    finally:
        os.unlink(path)


def _pixels_problem(data: bytes, limit: int) -> str | None:
    """Why an image is refused for its size, read from its header (nothing is decoded)."""
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
    except Image.DecompressionBombError as e:  # Pillow's own guard, far above the limit
        found = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(found.group(1)):,} pixels" if found else "a decompression bomb"
        return f"too large ({size}, limit {limit:,})"
    except Exception:  # noqa: BLE001 - not an image, or damaged: the loader says which
        return None
    if width * height > limit:
        return f"too large ({width}x{height} pixels, limit {limit:,})"
    return None


# --- batching --------------------------------------------------------------------------------

def bucket_sizes(max_batch: int) -> list[int]:
    """The batch sizes the model sees: powers of two and 1.5 times them (1, 2, 3, 4, 6, 8,
    12, ...) up to max_batch, and max_batch: few shapes to trace or compile, and padding
    that wastes at most a third of a batch (which a CPU computes as well)."""
    sizes = {max_batch}
    for i in range(max_batch.bit_length()):
        sizes.update(s for s in (1 << i, 3 << i >> 1) if 0 < s <= max_batch)
    return sorted(sizes)


def embed_rows(extractor, sizes: list[int] | None, arrays: list) -> np.ndarray:
    """Embeddings of prepared images; with `sizes`, the batch padded with zeros to the
    smallest of them that holds it."""
    batch = np.stack(arrays)
    n = len(arrays)
    size = next((s for s in sizes if s >= n), n) if sizes else n
    if size > n:
        batch = np.concatenate([batch, np.zeros((size - n, *batch.shape[1:]), batch.dtype)])
    return np.asarray(extractor.embed(batch), dtype=np.float32)[:n]


def fixed_shapes(extractor) -> bool:
    """Whether the model should see batches of a few sizes only: on an accelerator, and on
    JAX (which compiles each new shape). On a CPU, TensorFlow and the exported runtimes take
    any batch size, and padding would be computed in full."""
    if getattr(extractor, "input_shape", None) is None:  # prepare gives embeddings (dlib)
        return False
    found = extractor.provenance()
    if "backend" not in found:  # ONNX Runtime or OpenVINO: a CPU
        return False
    from featurize.models.keras import accelerator
    return found["backend"] == "jax" or accelerator()


class Batcher:
    """Gathers the images of concurrent requests into model batches: up to `max_batch`,
    waiting at most `max_wait_ms` after the first for more while `incoming` requests (being
    read or decoded) may still bring some. The model runs on `pool` (one thread)."""

    def __init__(self, embed, options: ServeOptions, pool):
        self.embed, self.pool = embed, pool
        self.max_batch, self.max_wait = options.max_batch, options.max_wait_ms / 1000
        self.incoming = 0
        self.queue = self.task = self.loop = None
        self.stats = {"requests": 0, "images": 0, "batches": 0, "largest_batch": 0,
                      "model_seconds": 0.0}

    async def submit(self, arrays: list) -> np.ndarray:
        loop = asyncio.get_running_loop()
        if self.task is None or self.task.done() or self.loop is not loop:
            self.queue, self.loop = asyncio.Queue(), loop
            self.task = loop.create_task(self._run())
        futures = [loop.create_future() for _ in arrays]
        for array, future in zip(arrays, futures):
            self.queue.put_nowait((array, future))
        self.stats["requests"] += 1
        return np.stack(await asyncio.gather(*futures))

    async def _gather(self) -> list:
        loop = asyncio.get_running_loop()
        batch = [await self.queue.get()]
        deadline = loop.time() + self.max_wait
        while len(batch) < self.max_batch:
            if not self.queue.empty():
                batch.append(self.queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0 or self.incoming == 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return [(a, f) for a, f in batch if not f.done()]  # a cancelled request's are dropped

    async def _run(self):
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            if not batch:
                continue
            try:
                X, seconds = await loop.run_in_executor(self.pool, _timed, self.embed,
                                                        [a for a, _ in batch])
            except Exception as e:  # noqa: BLE001 - each waiting request gets the error
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            self.stats["images"] += len(batch)
            self.stats["batches"] += 1
            self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch))
            self.stats["model_seconds"] += seconds
            for (_, future), row in zip(batch, X):
                if not future.done():
                    future.set_result(row)


def _timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


# --- the model: loaded once ---------------------------------------------------------------------

class Lane:
    """One extractor (embedding settings) and the batcher in front of it."""

    def __init__(self, extractor, settings, options: ServeOptions, pool):
        self.extractor, self.settings = extractor, settings
        self.prepare = extractor.prepare
        self.sizes = bucket_sizes(options.max_batch) if fixed_shapes(extractor) else None
        self.batcher = Batcher(functools.partial(embed_rows, extractor, self.sizes),
                               options, pool)

    def warm_up(self, max_batch: int) -> None:
        """Run the batch shapes the model will see once (Keras traces a shape on first use;
        TensorFlow, after two, one for any batch size)."""
        shape = getattr(self.extractor, "input_shape", None)
        if shape is not None:
            for size in self.sizes or sorted({1, min(2, max_batch), max_batch}):
                self.extractor.embed(np.zeros((size, *shape), np.uint8))

    def input_shape_known(self) -> bool:
        return getattr(self.extractor, "input_shape", None) is not None

    def runtime(self) -> str:
        found = self.extractor.provenance()
        return found.get("runtime") or ("keras" if "backend" in found else
                                        self.settings.backbone.split("-")[0])


class Scorer:
    """A run's head on embeddings: the rows of `classify predict --json` (classify/_predict.py)."""

    def __init__(self, run):
        record, model = run.record, run.pipeline
        self.kind = record.get("score_kind", "probability")
        self.rejector = run.rejector
        if runs.is_finetuned(record):  # the whole model gave its probabilities
            self.classes, self.score = record["classes"], np.asarray
        else:
            self.classes = [record["classes"][k] for k in model.classes_]
            if self.kind == "distance":
                head = model.named_steps["head"]
                self.score = lambda X: head.class_distances(heads.features(model, X))
            else:
                self.score = functools.partial(heads.scores, model)

    def __call__(self, names: list[str], X: np.ndarray, top_k: int) -> list[dict]:
        from classify._predict import _reject
        scores = np.asarray(self.score(X))
        order = np.argsort(scores if self.kind == "distance" else -scores, axis=1)
        results = []
        for name, row, ranks in zip(names, scores, order):
            top = [{"class": self.classes[j], self.kind: float(row[j])} for j in ranks[:top_k]]
            results.append({"image": name, "prediction": top[0]["class"], "top": top})
        if self.rejector is not None:
            _reject(results, self.rejector, X)
        return results


class Service:
    """The run, its head, the gallery and the model lanes, loaded once; what the routes use."""

    def __init__(self, run, gallery, options: ServeOptions, log):
        from featurize.settings import EmbeddingSettings
        self.run, self.gallery, self.options, self.log = run, gallery, options, log
        self.token = options.resolved_token()
        self.url = None  # set by `serve` once it listens
        self.model_pool = ThreadPoolExecutor(1, "classify-serve-model")
        self.search_pool = ThreadPoolExecutor(1, "classify-serve-search")
        self.settings = EmbeddingSettings.from_json(run.record["provenance"]["settings"])
        extractor = runs.extractor_for_run(run.record, run.pipeline)
        self.predict = Lane(extractor, self.settings, options, self.model_pool)
        self.embed = self._embed_lane()
        serial = any(_process_only(lane.extractor) for lane in self.lanes())
        self.decode_pool = ThreadPoolExecutor(1 if serial else min(DECODE_THREADS,
                                                                   os.cpu_count() or 1),
                                              "classify-serve-decode")
        self.scorer = Scorer(run)

    def _embed_lane(self) -> Lane:
        """What /embed and /search embed with: the gallery cache's settings (else the run's
        cache's); the predict lane itself when those are the run's own."""
        from featurize.runtimes import build_extractor
        from featurize.settings import EmbeddingSettings
        attrs = self.gallery.attrs if self.gallery is not None else self.run.record["provenance"]
        settings = EmbeddingSettings.from_json(attrs["settings"])
        if settings == self.settings and not runs.is_finetuned(self.run.record):
            return self.predict
        return Lane(build_extractor(settings, cache_attrs=attrs), settings, self.options,
                    self.model_pool)

    def lanes(self) -> list[Lane]:
        return [self.predict] + ([self.embed] if self.embed is not self.predict else [])

    def warm_up(self) -> None:
        for lane in self.lanes():
            lane.warm_up(self.options.max_batch)
        if self.predict.input_shape_known():
            X = embed_rows(self.predict.extractor, None, [np.zeros(self.predict.extractor
                                                                .input_shape, np.uint8)])
            self.scorer(["warm-up"], X, 1)

    def close(self) -> None:
        for pool in (self.decode_pool, self.model_pool, self.search_pool):
            pool.shutdown(wait=False, cancel_futures=True)

    async def embedded(self, request, lane: Lane) -> tuple[list[str], np.ndarray]:
        """The names and embeddings of a request's images; a 4xx Problem for a bad request."""
        loop = asyncio.get_running_loop()
        lane.batcher.incoming += 1
        try:
            images = await read_images(request, self.options)
            decoded = await asyncio.gather(*(
                loop.run_in_executor(self.decode_pool, decode, lane.prepare, data,
                                     self.options.max_pixels) for _, data in images))
        finally:
            lane.batcher.incoming -= 1
        bad = [{"image": name, "error": reason}
               for (name, _), (_, reason) in zip(images, decoded) if reason is not None]
        if bad:
            said = "; ".join(f"{b['image']}: {b['error']}" for b in bad[:3])
            raise Problem(422, f"{len(bad)} of {len(images)} images cannot be used ({said}); "
                               "send JPEG, PNG, BMP, GIF, TIFF or WebP images.", images=bad)
        X = await lane.batcher.submit([array for array, _ in decoded])
        return [name for name, _ in images], X

    async def on_model_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.model_pool, fn, *args)

    async def on_search_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.search_pool, fn, *args)


def _process_only(extractor) -> bool:
    """Whether the extractor's `prepare` must not run in several threads (dlib's)."""
    return "process" in (getattr(extractor, "parallel", "thread"),
                         getattr(getattr(extractor, "prepare", None), "parallel", "thread"))


def search_rows(service: Service, names: list[str], X: np.ndarray, k: int,
                thumbnails: bool) -> dict:
    """`classify search --json`'s document for embeddings, each query named by its upload."""
    gallery = service.gallery
    results = [{"image": names[r["query"]], "neighbours": r["neighbours"]}
               for r in gallery.search(X, k)]
    if thumbnails:
        for hit in (hit for r in results for hit in r["neighbours"]):
            hit["thumbnail"] = _thumbnail(hit["path"])
    return {"cache": str(gallery.path), "method": gallery.method, "results": results}


@functools.lru_cache(maxsize=4096)
def _thumbnail(path: str) -> str | None:
    from featurize.reporting import thumbnail_uri
    return thumbnail_uri(path, THUMB_SIDE)


# --- the app -------------------------------------------------------------------------------------

def create_app(run, cache=None, options: ServeOptions | None = None, *,
               trust_pickle: bool = False, log=None, **settings):
    """The ASGI app (FastAPI) serving `run` (a Run or a run folder, loaded with `Run.load`
    and its trust rules) and, with `cache` (a cache file), gallery search. `options` or its
    fields as keywords: see ServeOptions (host and port are `serve`'s). The model and head are
    loaded here, once; `log` gets one-line messages (None: silent). Mount it in your own app
    or run it with any ASGI server."""
    options = options_of(options, settings)
    fastapi = _require("fastapi")
    if not isinstance(run, runs.Run):
        run = runs.Run.load(run, trust_pickle=trust_pickle)
    gallery = None
    if cache is not None:
        from classify._search import Gallery, SearchOptions
        gallery = Gallery(cache, SearchOptions(k=options.k))
    log = log or (lambda message: None)
    service = Service(run, gallery, options, log)
    app = fastapi.FastAPI(title="classify serve", version=installed_version("featurize-embeddings"),
                          description=_DESCRIPTION, lifespan=_lifespan(service))
    app.state.classify = service
    _install_error_handlers(app)
    auth = _auth(service.token)
    _add_status_routes(app, service, auth)
    _add_model_routes(app, service, auth)
    _add_page(app, service)
    app.add_middleware(BodyLimit, limit=options.max_upload_bytes)
    return app


_DESCRIPTION = ("Predict classes of images with a trained run, search a gallery cache, "
                "and embed images, batched on one model. Every route but /health, / and the "
                "docs needs `Authorization: Bearer TOKEN` when the server has a token.")


def _lifespan(service: Service):
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        await service.on_model_thread(service.warm_up)
        if service.gallery is not None:  # an approximate index is loaded or built now
            await service.on_search_thread(service.gallery.nearest,
                                           np.ones((1, service.gallery.dim), np.float32), 1)
        if service.url:
            service.log(_ready_line(service))
        try:
            yield
        finally:
            service.close()
    return lifespan


def _ready_line(service: Service) -> str:
    run, url = service.run, service.url
    what = f"{run.head} run {run.path or '(in memory)'} ({len(run.classes)} classes)"
    gallery = f", gallery {service.gallery.path}" if service.gallery is not None else ""
    token = "; requests need the token" if service.token else ""
    return (f"serving {what}{gallery} on {url} (page: {url} API docs: {url}docs){token}; "
            "Ctrl-C to stop")


def _auth(token: str | None):
    """The dependency that checks `Authorization: Bearer TOKEN` (none without a token)."""
    from fastapi import Depends
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
    if token is None:
        return []
    bearer = HTTPBearer(auto_error=False, description="the server's token (--token)")
    expected = token.encode()

    def check(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]):
        challenge = {"WWW-Authenticate": "Bearer"}
        if credentials is None:
            raise Problem(401, "this server needs a token: send the header Authorization: "
                               "Bearer TOKEN.", challenge)
        if not hmac.compare_digest(credentials.credentials.encode(), expected):
            raise Problem(401, "wrong token.", challenge)
    return [Depends(check)]


def _query_number(name: str, value, default: int) -> int:
    if value is None:
        return default
    if not 1 <= value <= MAX_K:
        raise Problem(422, f"{name} must be between 1 and {MAX_K}, not {value}.")
    return value


_IMAGES_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {"image": {
        "type": "array", "items": {"type": "string", "format": "binary"}}}}},
    "application/json": {"schema": {"type": "object", "properties": {"images": {
        "type": "array", "items": {"type": "string", "format": "base64"}}}}}}}}


def _add_model_routes(app, service: Service, auth) -> None:
    from fastapi import Request
    options = service.options
    body = {"dependencies": auth, "openapi_extra": _IMAGES_BODY}

    @app.post("/predict", summary="Top classes of each image", **body)
    async def predict(request: Request, top_k: int | None = None):
        """The top-k classes of each image with their scores (as `classify predict`); an
        open-set run adds `score`, `threshold`, and `prediction` "unknown" below it."""
        top_k = _query_number("top_k", top_k, options.top_k)
        names, X = await service.embedded(request, service.predict)
        results = await service.on_model_thread(service.scorer, names, X, top_k)
        return {"run": str(service.run.path or ""), "results": results}

    @app.post("/search", summary="Nearest gallery images of each image", **body)
    async def search(request: Request, k: int | None = None, thumbnails: bool = False):
        """The k gallery rows nearest to each image by cosine distance (as `classify
        search`); `thumbnails=true` adds each neighbour's picture as a data: URI."""
        if service.gallery is None:
            raise Problem(404, "this server has no gallery: start it with --cache CACHE "
                               "to search.")
        k = _query_number("k", k, options.k)
        names, X = await service.embedded(request, service.embed)
        return await service.on_search_thread(search_rows, service, names, X, k, thumbnails)

    @app.post("/embed", summary="The embedding of each image", **body)
    async def embed(request: Request):
        """Each image's embedding, with the embedding settings that made it (the
        gallery cache's, else the run's cache's)."""
        names, X = await service.embedded(request, service.embed)
        return {"settings": json.loads(service.embed.settings.to_json()),
                "settings_key": service.embed.settings.key(), "dim": int(X.shape[1]),
                "results": [{"image": name, "embedding": row.tolist()}
                            for name, row in zip(names, X)]}


def _add_status_routes(app, service: Service, auth) -> None:
    @app.get("/health", summary="Whether the server is up")
    async def health():
        return {"status": "ok", "token_required": service.token is not None,
                "gallery": service.gallery is not None}

    @app.get("/info", summary="The run, its model and the server's settings", dependencies=auth)
    async def info():
        return describe(service)


def describe(service: Service) -> dict:
    """/info: the run, the model that serves it, the gallery, limits, batching, versions."""
    run, settings, gallery = service.run, service.settings, service.gallery
    return {
        "run": str(run.path or ""), "head": run.head, "classes": run.classes,
        "score_kind": service.scorer.kind, "backbone": settings.backbone,
        "runtime": service.predict.runtime(), "precision": settings.precision,
        "input_size": settings.input_size, "settings_key": settings.key(),
        "open_set": None if run.rejector is None else {"threshold": run.threshold},
        "cache": None if gallery is None else {
            "path": str(gallery.path), "rows": gallery.rows, "method": gallery.method,
            "settings_key": service.embed.settings.key()},
        "options": service.options.public(), "token_required": service.token is not None,
        "batching": {name: lane.batcher.stats for name, lane in
                     (("predict", service.predict), ("embed", service.embed))},
        "versions": versions(service),
    }


def versions(service: Service) -> dict:
    found = {"python": platform.python_version()}
    for dist in ("featurize-embeddings", "numpy", "scikit-learn", "keras", "fastapi", "uvicorn"):
        found[dist] = installed_version(dist, "not installed")
    for lane in service.lanes():
        found.update({k: str(v) for k, v in lane.extractor.provenance().items()})
    return found


def _add_page(app, service: Service) -> None:
    from fastapi.responses import HTMLResponse, Response

    @app.get("/", include_in_schema=False)
    async def page():
        from classify._html import render
        nonce = secrets.token_urlsafe(16)
        html = render("serve.html", title="classify serve", nonce=nonce)
        policy = (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'unsafe-inline'; "
                  "img-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; "
                  "form-action 'none'; frame-ancestors 'none'")
        return HTMLResponse(html, headers={"content-security-policy": policy,
                                           "cache-control": "no-store"})

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return Response(status_code=204)


# --- serving ---------------------------------------------------------------------------------

def serve(run, cache=None, options: ServeOptions | None = None, *, trust_pickle: bool = False,
          log=None, **settings) -> None:
    """Serve `run` (and a gallery `cache`) over HTTP until Ctrl-C or SIGTERM, which let the
    requests in flight finish first. `options`, or ServeOptions fields as keywords (host,
    port, token, max_batch, ...). Everything is checked, and the model loaded, before the
    port is opened; `log` gets the line saying where it listens (None: printed)."""
    options = options_of(options, settings)
    uvicorn = _require("uvicorn")
    app = create_app(run, cache, options, trust_pickle=trust_pickle,
                     log=log or functools.partial(print, flush=True))
    service = app.state.classify
    try:
        sock = listen(options.host, options.port)
    except UserError:
        service.close()
        raise
    service.url = _url(*sock.getsockname()[:2])
    if service.token is None and not _is_loopback(sock.getsockname()[0]):
        print(f"warning: serving on {service.url} without a token: anyone who can reach it "
              f"can use the model; pass --token or set {TOKEN_ENV}.", file=sys.stderr)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=GRACEFUL_SECONDS, server_header=False)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # the signal uvicorn raises again once it has shut down
        pass
    finally:
        sock.close()
        service.close()


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one); a UserError if it cannot be."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e}); check --host.") \
            from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another "
                        "--port (0: any free one) or --host.") from None
    return sock


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _require(module: str):
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"serving needs {module}: {INSTALL_HINT}.") from None
