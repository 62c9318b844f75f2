"""`classify serve` under load: 16 concurrent clients against the real server on 127.0.0.1.

Builds a run to serve (a logreg head on a cache of --people x --per-person images: LFW's
people with the most images where LFW is found, else generated pictures; the backbone with
random weights unless --weights says otherwise, so it runs offline), or serves --run (and
--cache) as given. Then, in the same run of this script, for batched serving (--max-batch,
default 32) and one image at a time (max_batch 1): starts `python -m classify serve` on a free
port, sends --requests POST /predict requests from --clients threads (one image each,
keep-alive connections, bodies encoded beforehand; every --bad-every-th request is a truncated
JPEG, which must be a 422), and reports throughput, p50/p99 latency, errors (no answer), 5xx
and unexpected statuses, the mean model batch the server formed and how busy its model thread
was. For comparison, featurize's own rate for the same model (in-process, decoding included,
batches of 32) is measured first.

    python benchmarks/serve.py                                   # 2,000 requests per mode
    python benchmarks/serve.py --requests 500 --input-size 32 --runtime keras
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from common import LFW, REPO, command_line, save

READY = re.compile(r"^serving .* on (http://[^ ]+/) ")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=2000, help="per mode (default: %(default)s)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--max-batch", type=int, default=32, help="of the batched server")
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--backbone", default="vggface-vgg16")
    p.add_argument("--weights", default="none", help="none: random weights, offline")
    p.add_argument("--input-size", type=int, help="default: the backbone's own")
    p.add_argument("--runtime", help="keras, onnx or openvino (default: featurize's choice); "
                   "the server gets it as FEATURIZE_RUNTIME")
    p.add_argument("--people", type=int, default=8)
    p.add_argument("--per-person", type=int, default=10)
    p.add_argument("--bad-every", type=int, default=50, help="every Nth request is a bad "
                   "upload (0: none)")
    p.add_argument("--run", help="serve this run folder instead of building one")
    p.add_argument("--cache", help="with --run: a gallery cache to serve too")
    p.add_argument("--images", help="with --run: a folder of .jpg images to send")
    p.add_argument("--name", default="serve")
    return p.parse_args()


def dataset(folder: Path, people: int, per_person: int) -> Path:
    """Class folders of images: LFW's people with the most images, else generated ones."""
    from PIL import Image
    lfw = LFW / "lfw-deepfunneled"
    if lfw.is_dir():
        ranked = sorted(lfw.iterdir(), key=lambda d: -len(os.listdir(d)))[:people]
        for person in ranked:
            (folder / person.name).mkdir(parents=True)
            for image in sorted(person.iterdir())[:per_person]:
                (folder / person.name / image.name).symlink_to(image)
        return folder
    rng = np.random.default_rng(0)
    for c in range(people):
        (folder / f"person{c}").mkdir(parents=True)
        colour = rng.integers(0, 256, 3)
        for i in range(per_person):
            pixels = np.clip(colour + rng.normal(0, 40, (250, 250, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"person{c}" / f"{i:04d}.jpg", quality=90)
    return folder


def build_run(args, work: Path) -> tuple[Path, Path, dict]:
    """(run folder, cache, featurize's own figures for the model)."""
    import classify
    import featurize
    root = dataset(work / "images", args.people, args.per_person)
    embedder = featurize.Embedder(args.backbone, weights=args.weights,
                                  input_size=args.input_size, runtime=args.runtime)
    cache = featurize.embed_folder(root, embedder, cache=work / "cache.h5", progress=False)
    run = classify.train(cache.path, "logreg", {"C": 10}, test_size=0.3)
    run.save(work / "run")
    return work / "run", cache.path, featurize_rate(embedder, root)


def featurize_rate(embedder, root: Path) -> dict:
    """featurize's in-process embedding rate for the model: decode + embed, batches of 32."""
    paths = sorted(str(p) for p in root.rglob("*.jpg"))
    batch = (paths * (64 // len(paths) + 1))[:64]
    embedder(batch[:32], batch_size=32)  # build and trace first
    start = time.perf_counter()
    embedder(batch, batch_size=32)
    seconds = time.perf_counter() - start
    return {"images": len(batch), "seconds": seconds, "img_per_s": len(batch) / seconds,
            "input_size": embedder.settings.input_size}


class Server:
    def __init__(self, run: Path, cache: Path | None, max_batch: int, max_wait_ms: float):
        argv = [sys.executable, "-m", "classify", "serve", "--run", str(run), "--port", "0",
                "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms)]
        if cache:
            argv += ["--cache", str(cache)]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop("FEATURIZE_SERVE_TOKEN", None)
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env)
        for line in self.proc.stdout:
            found = READY.match(line)
            if found:
                self.url = found.group(1)
                return
        sys.exit(f"the server did not start (exit {self.proc.wait()})")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=120)


def multipart(name: str, body: bytes) -> tuple[bytes, str]:
    """A multipart/form-data body holding one image file, and its content type: encoded once,
    so the clients spend next to no CPU (they share the machine with the server)."""
    boundary = "serve-benchmark-boundary"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"'
            f"\r\nContent-Type: image/jpeg\r\n\r\n").encode()
    return head + body + f"\r\n--{boundary}--\r\n".encode(), \
        f"multipart/form-data; boundary={boundary}"


def load(url: str, images: list[bytes], bad: bytes, args) -> dict:
    """--requests POST /predict from --clients threads (keep-alive connections); latencies
    and statuses."""
    import http.client
    import urllib.parse
    where = urllib.parse.urlsplit(url)
    bodies = [multipart(f"{n}.jpg", b) for n, b in enumerate(images)]
    broken = multipart("bad.jpg", bad)
    counter, lock = iter(range(args.requests)), threading.Lock()
    latencies, statuses, errors = [], {}, []

    def client():
        connection = http.client.HTTPConnection(where.hostname, where.port, timeout=300)
        while (n := next_number()) is not None:
            is_bad = bool(args.bad_every) and n % args.bad_every == args.bad_every - 1
            body, kind = broken if is_bad else bodies[n % len(bodies)]
            start = time.perf_counter()
            try:
                connection.request("POST", "/predict", body, {"Content-Type": kind})
                response = connection.getresponse()
                response.read()
            except (OSError, http.client.HTTPException) as e:
                connection.close()
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                continue
            took = time.perf_counter() - start
            key = f"{response.status}{' (bad upload)' if is_bad else ''}"
            with lock:
                statuses[key] = statuses.get(key, 0) + 1
                if not is_bad:
                    latencies.append(took)
        connection.close()

    def next_number():
        with lock:
            return next(counter, None)

    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    expected = {"200", "422 (bad upload)"}
    return {"requests": args.requests, "clients": args.clients, "seconds": wall,
            "req_per_s": statuses.get("200", 0) / wall,
            "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * float(np.quantile(latencies, 0.99)), "statuses": statuses,
            "errors": len(errors), "error_examples": errors[:3],
            "status_5xx": sum(v for k, v in statuses.items() if k.startswith("5")),
            "unexpected": sum(v for k, v in statuses.items() if k not in expected)}


def measure(run, cache, max_batch, images, bad, args) -> dict:
    import httpx
    server = Server(run, cache, max_batch, args.max_wait_ms)
    try:
        with httpx.Client(base_url=server.url, timeout=300) as http:  # a few warm-up requests
            for body in images[:4]:
                http.post("predict", files=[("image", ("w.jpg", body, "image/jpeg"))])
        figures = load(server.url, images, bad, args)
        with httpx.Client(base_url=server.url, timeout=60) as http:
            stats = http.get("info").json()["batching"]["predict"]
    finally:
        code = server.stop()
    figures.update(max_batch=max_batch, max_wait_ms=args.max_wait_ms, exit_code=code,
                   model_batches=stats["batches"], largest_batch=stats["largest_batch"],
                   mean_batch=stats["images"] / max(1, stats["batches"]),
                   model_busy=stats["model_seconds"] / figures["seconds"])
    return figures


def show(name: str, f: dict) -> None:
    print(f"{name:>16}: {f['req_per_s']:7.1f} req/s  p50 {f['p50_ms']:7.1f} ms  p99 "
          f"{f['p99_ms']:7.1f} ms  mean batch {f['mean_batch']:5.1f}  model busy {f['model_busy']:.0%}  errors {f['errors']}  "
          f"5xx {f['status_5xx']}  unexpected {f['unexpected']}  statuses {f['statuses']}")


def main():
    args = parse_args()
    if args.runtime:
        os.environ["FEATURIZE_RUNTIME"] = args.runtime  # the servers' too
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        work = Path(tmp)
        if args.run:
            run, cache, own = Path(args.run), args.cache, None
            images = sorted(Path(args.images or LFW / "lfw-deepfunneled").rglob("*.jpg"))[:64]
        else:
            run, cache, own = build_run(args, work)
            images = sorted((work / "images").rglob("*.jpg"))
        if not images:
            sys.exit("no .jpg images found to send")
        bodies = [p.read_bytes() for p in images]
        bad = bodies[0][:len(bodies[0]) // 3]  # a truncated JPEG
        if own:
            print(f"featurize in-process, same model: {own['img_per_s']:.1f} img/s")
        results = {}
        for name, size in (("batched", args.max_batch), ("one_at_a_time", 1)):
            results[name] = measure(run, cache, size, bodies, bad, args)
            show(name, results[name])
    gain = results["batched"]["req_per_s"] / results["one_at_a_time"]["req_per_s"]
    print(f"batched / one at a time: {gain:.2f}x")
    save(args.name, {"backbone": args.backbone, "weights": args.weights, "featurize": own,
                     "gain": gain, **results}, command_line())


if __name__ == "__main__":
    main()
