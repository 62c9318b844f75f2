"""`python -m classify serve` (issue #24), tested the way it is used: the real server in a
fresh process on 127.0.0.1, spoken to over HTTP. /predict, /search and /embed give the numbers
of `classify predict`, `classify search` and the cache; bad uploads are 4xx JSON errors naming
the problem; concurrent requests are batched; the token is required when set; SIGTERM stops
it cleanly; the page works in a headless Chromium (skipped where there is none)."""

import base64
import json
import os
import queue
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from conftest import (
    LFW_IMAGES,
    call_cli,
    cli_command,
    cli_env,
    make_folder,
    one_line_error,
    run_python,
    same,
    write_image,
)

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

TINY = dict(backbone="vggface-vgg16", weights="none", input_size=32, progress=False)
CLASSES = ("alice", "bob", "carol", "dave", "erin", "frank")
TOKEN = "test-token-1234"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
IMAGES = ("bob/bob_0001.jpg", "alice/alice_0002.jpg", "frank/frank_0005.jpg")
START_SECONDS = 300  # loading TensorFlow and the model on 2 busy cores


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """6 people of 6 images, their cache (random-weight vgg16) and an --open-set logreg run."""
    import classify
    from featurize.jobs.run import featurize
    base = tmp_path_factory.mktemp("serve")
    root = make_folder(base / "faces", classes=CLASSES, per_class=6)
    cache = featurize(root, cache_dir=base / "cache", **TINY).path
    run = classify.train(cache, "logreg", {"C": 10}, open_set=True)
    run.save(base / "run")
    plain = classify.train(cache, "centroid").save(base / "plain-run")
    return {"base": base, "root": root, "cache": cache, "run": base / "run", "plain": plain,
            "images": [root / name for name in IMAGES]}


class Server:
    """A `python -m classify serve` process: its URL once it says it listens."""

    def __init__(self, argv, env=None, cwd=None):
        self.stderr = open(Path(cwd or ".") / f"serve-{os.getpid()}-{id(self)}.err", "w+")
        self.proc = subprocess.Popen(argv, env=env or cli_env(), cwd=cwd, text=True,
                                     stdout=subprocess.PIPE, stderr=self.stderr)
        self.lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.url = self._wait_for_url()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _wait_for_url(self) -> str:
        while True:
            try:
                line = self.lines.get(timeout=START_SECONDS)
            except queue.Empty:
                self.proc.kill()
                raise AssertionError(f"the server did not start: {self.errors()}") from None
            if line is None:
                raise AssertionError(f"the server exited ({self.proc.wait()}): {self.errors()}")
            found = re.search(r" on (http://127\.0\.0\.1:\d+/) ", line)
            if line.startswith("serving") and found:
                return found.group(1)

    def errors(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()[-3000:]

    def client(self, **headers) -> "httpx.Client":
        return httpx.Client(base_url=self.url, headers=headers, timeout=120)

    def stop(self) -> tuple[int, str]:
        """SIGTERM; (exit code, what it printed after)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=60)
        rest = []
        while (line := self.lines.get(timeout=10)) is not None:
            rest.append(line)
        return code, "".join(rest)


def serve_command(*args) -> list[str]:
    return cli_command("classify", "serve", *args)


@pytest.fixture(scope="module")
def server(world):
    s = Server(serve_command("--run", world["run"], "--cache", world["cache"], "--port", 0,
                             "--token", TOKEN), cwd=world["base"])
    yield s
    code, rest = s.stop()
    assert code == 0 and rest.strip().endswith("stopped"), (code, rest, s.errors())
    assert "Traceback" not in s.errors(), s.errors()


@pytest.fixture
def api(server):
    with server.client(**AUTH) as client:
        yield client


def files(*paths, field="image"):
    return [(field, (Path(p).name, Path(p).read_bytes(), "application/octet-stream"))
            for p in paths]


def assert_error(response, status, *needles) -> dict:
    """A JSON error: the status, one `error` line naming each needle, no traceback."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    doc = response.json()
    assert "Traceback" not in response.text and "\n" not in doc["error"]
    for needle in needles:
        assert needle in doc["error"], (needle, doc)
    return doc


# --- the routes -------------------------------------------------------------------------------

def test_health_is_open_and_info_describes_the_run_behind_the_token(server, api, world):
    with server.client() as anonymous:
        assert anonymous.get("health").json() == {"status": "ok", "token_required": True,
                                                  "gallery": True}
        assert_error(anonymous.get("info"), 401, "Authorization: Bearer")
        assert anonymous.get("info").headers["www-authenticate"] == "Bearer"
        assert_error(anonymous.post("predict", files=files(world["images"][0])), 401)
        assert_error(anonymous.post("embed", files=files(world["images"][0])), 401)
    with server.client(Authorization="Bearer wrong-token") as wrong:
        assert_error(wrong.get("info"), 401, "wrong token")
        assert_error(wrong.post("search", files=files(world["images"][0])), 401)
    info = api.get("info").json()
    assert info["run"] == str(world["run"]) and info["head"] == "logreg"
    assert info["classes"] == sorted(info["classes"]) and set(info["classes"]) <= set(CLASSES)
    assert (info["backbone"], info["runtime"], info["precision"], info["input_size"]) == \
        ("vggface-vgg16", "keras", "float32", 32)
    assert info["open_set"]["threshold"] == pytest.approx(
        json.loads((world["run"] / "run.json").read_text())["metrics"]["open_set"]["threshold"])
    assert info["cache"]["rows"] == 36 and info["cache"]["method"] == "exact"
    assert {"featurize-embeddings", "keras", "fastapi", "uvicorn", "python"} <= set(info["versions"])
    assert "token" not in info["options"] and TOKEN not in json.dumps(info)
    assert api.get("openapi.json").json()["paths"].keys() >= {"/predict", "/search", "/embed",
                                                             "/health", "/info"}


def test_predict_gives_the_numbers_of_classify_predict(api, world, tmp_path):
    paths = world["images"]
    ran = call_cli("classify", "predict", *paths, "--run", world["run"], "--json",
                   "--top-k", 3, cwd=tmp_path)
    expected = json.loads(ran.stdout)
    multipart = api.post("predict", params={"top_k": 3}, files=files(*paths))
    as_json = api.post("predict", params={"top_k": 3}, json={"images": [
        {"name": p.name, "data": base64.b64encode(p.read_bytes()).decode()} for p in paths]})
    for response in (multipart, as_json):
        assert response.status_code == 200, response.text
        got = response.json()["results"]
        assert [r["image"] for r in got] == [p.name for p in paths]
        for mine, theirs in zip(got, expected):
            assert_same_prediction(mine, theirs)
    one = api.post("predict", json={"image": base64.b64encode(paths[0].read_bytes()).decode()})
    assert one.json()["results"][0]["image"] == "image0"
    classes = json.loads((world["run"] / "run.json").read_text())["classes"]
    assert len(one.json()["results"][0]["top"]) == min(5, len(classes))  # the default top_k


def assert_same_prediction(mine: dict, theirs: dict):
    assert mine["prediction"] == theirs["prediction"]
    assert [t["class"] for t in mine["top"]] == [t["class"] for t in theirs["top"]]
    np.testing.assert_allclose([t["probability"] for t in mine["top"]],
                               [t["probability"] for t in theirs["top"]], rtol=same(), atol=1e-6)
    assert mine["threshold"] == theirs["threshold"]  # an --open-set run: the verdict too
    assert mine["score"] == pytest.approx(theirs["score"], rel=same(), abs=1e-6)


def test_search_gives_the_neighbours_of_classify_search(api, world, tmp_path):
    paths = world["images"][:2]
    ran = call_cli("classify", "search", *paths, "--cache", world["cache"], "-k", 4, "--json",
                   cwd=tmp_path)
    expected = json.loads(ran.stdout)
    response = api.post("search", params={"k": 4}, files=files(*paths))
    assert response.status_code == 200, response.text
    got = response.json()
    assert got["method"] == expected["method"] == "exact"
    for mine, theirs in zip(got["results"], expected["results"]):
        assert [(h["row"], h["path"], h["label"]) for h in mine["neighbours"]] == \
            [(h["row"], h["path"], h["label"]) for h in theirs["neighbours"]]
        np.testing.assert_allclose([h["distance"] for h in mine["neighbours"]],
                                   [h["distance"] for h in theirs["neighbours"]], atol=1e-5)
        assert mine["neighbours"][0]["path"].endswith(mine["image"])  # itself, at distance ~0
    pictures = api.post("search", params={"thumbnails": "true"}, files=files(paths[0])).json()
    hits = pictures["results"][0]["neighbours"]
    assert len(hits) == 10 and all(h["thumbnail"].startswith("data:image/jpeg;base64,")
                                   for h in hits)


def test_embed_gives_the_cache_rows_and_the_settings_that_made_them(api, world):
    from featurize import cache
    c = cache.read(world["cache"])
    response = api.post("embed", files=files(*world["images"]))
    assert response.status_code == 200, response.text
    got = response.json()
    assert got["settings"] == json.loads(c.settings.to_json())
    assert got["settings_key"] == c.settings.key() and got["dim"] == 512
    rows = c.embeddings[[c.paths.index(name) for name in IMAGES]]
    np.testing.assert_allclose([r["embedding"] for r in got["results"]], rows,
                               rtol=same(), atol=1e-5)


def test_concurrent_requests_are_batched_and_answered_as_one_at_a_time(api, world):
    paths = sorted(world["root"].rglob("*.jpg"))[:16]
    alone = [api.post("predict", files=files(p)).json()["results"][0] for p in paths[:4]]
    before = api.get("info").json()["batching"]["predict"]

    def one(path):
        return api.post("predict", files=files(path))

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(one, paths * 2))
    assert [r.status_code for r in responses] == [200] * 32
    for mine, theirs in zip([r.json()["results"][0] for r in responses], alone):
        assert_same_prediction(mine, theirs)
    after = api.get("info").json()["batching"]["predict"]
    images, batches = (after[k] - before[k] for k in ("images", "batches"))
    assert images == 32 and batches < images  # gathered into fewer model batches
    assert after["largest_batch"] > 1


# --- bad requests ----------------------------------------------------------------------------

def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width: int, height: int, compressed: bytes) -> bytes:
    """A grey PNG whose header says width x height, with `compressed` as its pixel data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", compressed)
            + png_chunk(b"IEND", b""))


def constant_png(width: int, height: int) -> bytes:
    """A real, all-black PNG: tens of megapixels in a few tens of kilobytes."""
    squeeze = zlib.compressobj(9)
    line = b"\x00" * (width + 1)  # the filter byte, then the pixels
    return png(width, height, b"".join(squeeze.compress(line) for _ in range(height))
               + squeeze.flush())


@pytest.fixture(scope="module")
def bad_files(world):
    big = write_image(world["base"] / "big.jpg", seed=5, size=(300, 300))
    return {"empty.jpg": b"", "notes.txt": b"hello, not an image\n" * 20,
            "truncated.jpg": big.read_bytes()[:len(big.read_bytes()) // 2],
            "bomb.png": png(30000, 30000, zlib.compress(b"\x00" * 30001)),
            "large.png": constant_png(8000, 6000)}


@pytest.mark.parametrize("name, said", [
    ("empty.jpg", "empty file"), ("notes.txt", "not an image"),
    ("truncated.jpg", "corrupt"), ("bomb.png", "too large (900,000,000 pixels"),
    ("large.png", "too large (8000x6000 pixels, limit 40,000,000)")])
def test_a_bad_upload_is_a_422_naming_the_image_and_the_problem(api, bad_files, world, name,
                                                                said):
    for route in ("predict", "search", "embed"):
        response = api.post(route, files=[("image", (name, bad_files[name], "image/png"))]
                            + files(world["images"][0]))
        doc = assert_error(response, 422, "1 of 2 images cannot be used", name, said)
        assert doc["images"] == [{"image": name, "error": doc["images"][0]["error"]}]
    assert api.get("health").status_code == 200


def test_a_body_over_the_upload_limit_is_a_413_and_the_server_goes_on(api, world):
    fifty_mb = b"\xff\xd8\xff" + os.urandom(1024) * (50 * 1024)
    response = api.post("predict", files=[("image", ("huge.jpg", fifty_mb, "image/jpeg"))])
    assert_error(response, 413, "upload limit of 20,971,520 bytes")
    assert api.post("predict", files=files(world["images"][0])).status_code == 200


@pytest.mark.parametrize("request_kwargs, status, said", [
    ({}, 400, "send the images as multipart/form-data"),
    ({"content": b"x=1", "headers": {"content-type": "application/x-www-form-urlencoded"}},
     415, "not application/x-www-form-urlencoded"),
    ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400,
     "not JSON"),
    ({"json": {"images": ["!!not base64!!"]}}, 400, "images[0] is not valid base64"),
    ({"json": {"images": [42]}}, 400, "images[0] is not a base64 string"),
    ({"json": {"images": []}}, 400, "holds no image"),
    ({"json": {"pictures": []}}, 400, '{"images": [BASE64, ...]}'),
    ({"json": {"images": ["AAAA"] * 33}}, 413, "over the limit of 32 (--max-images)"),
])
def test_a_malformed_request_is_a_4xx_saying_what_to_send(api, request_kwargs, status, said):
    assert_error(api.post("predict", **request_kwargs), status, said)


def test_bad_query_values_and_unknown_routes_are_json_errors(api, world):
    image = files(world["images"][0])
    assert_error(api.post("predict", params={"top_k": 0}, files=image), 422,
                 "top_k must be between 1 and 1000")
    assert_error(api.post("predict", params={"top_k": "many"}, files=image), 422, "top_k")
    assert_error(api.post("search", params={"k": 5000}, files=image), 422, "k must be")
    assert_error(api.get("nowhere"), 404)
    assert_error(api.get("predict"), 405)


def test_the_page_needs_no_token_and_keeps_to_its_own_origin(server):
    with server.client() as anonymous:
        page = anonymous.get("")
        assert page.status_code == 200 and "<title>classify serve</title>" in page.text
        policy = page.headers["content-security-policy"]
        nonce = re.search(r"'nonce-([^']+)'", policy).group(1)
        assert f'<script nonce="{nonce}">' in page.text and "connect-src 'self'" in policy
        assert page.headers["x-content-type-options"] == "nosniff"
        assert anonymous.get("favicon.ico").status_code == 204
        assert "classes" not in page.text.split("<script")[0]  # nothing of the run shown


# --- options, the Python API, the environment ----------------------------------------------

def test_options_are_checked_before_the_run_is_read(tmp_path):
    from classify._serve import ServeOptions
    from featurize.errors import OptionError
    with pytest.raises(OptionError, match="max_batch must be between 1 and 1024"):
        ServeOptions(max_batch=0)
    with pytest.raises(OptionError, match="token must be a non-empty string"):
        ServeOptions(token="has space")
    assert "secret" not in repr(ServeOptions(token="secret"))
    for argv, needles in [
            (["--run", tmp_path / "nowhere", "--port", 70000], ["--port must be between 0"]),
            (["--run", tmp_path / "nowhere", "--max-wait-ms", -1], ["--max-wait-ms"]),
            (["--run", tmp_path / "nowhere", "--token", ""], ["--token must be a non-empty"]),
            (["--run", tmp_path / "nowhere"], ["nowhere is not a run folder"]),
            (["--port", 8000], ["--run"])]:
        ran = call_cli("classify", "serve", *argv, cwd=tmp_path)
        one_line_error(ran.returncode, ran.stderr, *needles)


def test_a_busy_port_is_one_line_and_no_server(world, tmp_path):
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ran = call_cli("classify", "serve", "--run", world["plain"], "--port", port,
                       cwd=tmp_path)
    one_line_error(ran.returncode, ran.stderr, f"cannot listen on 127.0.0.1:{port}",
                   "choose another --port")


def test_the_python_api_serves_with_the_token_from_the_environment(world):
    code = ("import classify\n"
            f"classify.serve({str(world['plain'])!r}, port=0, max_batch=4, max_wait_ms=1)\n")
    s = Server([sys.executable, "-c", code],
               env=cli_env(FEATURIZE_SERVE_TOKEN="from-env-5678"), cwd=world["base"])
    try:
        with s.client() as anonymous:
            assert_error(anonymous.get("info"), 401)
        with s.client(Authorization="Bearer from-env-5678") as api:
            info = api.get("info").json()
            assert info["head"] == "centroid" and info["cache"] is None
            assert info["options"]["max_batch"] == 4
            got = api.post("predict", files=files(world["images"][0])).json()["results"][0]
            assert "distance" in got["top"][0] and "score" not in got  # a closed-set run
            assert_error(api.post("search", files=files(world["images"][0])), 404,
                         "no gallery", "--cache")
            embedded = api.post("embed", files=files(world["images"][0])).json()
            assert embedded["dim"] == 512
    finally:
        code, _ = s.stop()
    assert code in (0, -signal.SIGTERM), s.errors()  # Python's own SIGTERM: after shutting down
    assert "Traceback" not in s.errors(), s.errors()


def test_create_app_mounts_in_an_application_of_ones_own(world):
    import asyncio

    from fastapi import FastAPI

    import classify
    app = classify.create_app(world["plain"], max_batch=2)
    outer = FastAPI()
    outer.mount("/faces", app)  # a mounted app gets no lifespan events: it starts on first use

    async def use():
        transport = httpx.ASGITransport(app=outer)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            answers = await asyncio.gather(*(client.post("/faces/predict", files=files(p))
                                             for p in world["images"]))
            health = await client.get("/faces/health")
        return answers, health.json()

    try:
        answers, health = asyncio.run(use())
    finally:
        app.state.classify.close()
    assert [r.status_code for r in answers] == [200] * 3, answers[0].text
    assert [r.json()["results"][0]["image"] for r in answers] == [p.name for p in world["images"]]
    assert health["token_required"] is False


def test_importing_classify_loads_no_web_framework():
    ran = run_python("import sys, classify\nprint(sorted(m for m in ('fastapi', 'uvicorn', "
                     "'starlette', 'classify._serve') if m in sys.modules))\n"
                     "print(callable(classify.create_app), callable(classify.serve))")
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.split("\n")[:2] == ["[]", "True True"]


# --- the page in a headless Chromium ---------------------------------------------------------

def _chromium() -> tuple[str, str]:
    """(browser, driver) paths, or skip saying what is missing."""
    pytest.importorskip("selenium", reason="the browser test drives Chromium with selenium")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("Chromium and its driver are not installed (Debian: apt-get install "
                    "chromium chromium-driver)")
    return browser, driver


def test_the_page_in_headless_chromium_shows_the_answer_without_a_console_error(server, world):
    browser, driver_path = _chromium()
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    lfw = sorted(LFW_IMAGES.glob("*/*.jpg"))[:1] if LFW_IMAGES.is_dir() else []
    image = lfw[0] if lfw else world["images"][0]
    driver = webdriver.Chrome(options=options,
                              service=webdriver.ChromeService(executable_path=driver_path))
    try:
        wait = WebDriverWait(driver, 120)
        state = lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state")  # noqa: E731
        driver.get(server.url)
        wait.until(lambda d: state(d) == "token")
        driver.find_element(By.ID, "token").send_keys(TOKEN)
        driver.find_element(By.CSS_SELECTOR, "#token-form button").click()
        wait.until(lambda d: state(d) == "ready")
        classes = json.loads((world["run"] / "run.json").read_text())["classes"]
        assert f"logreg on {len(classes)} classes" in driver.find_element(By.ID, "about").text
        driver.find_element(By.ID, "file").send_keys(str(image))
        wait.until(lambda d: state(d) in ("done", "error"))
        assert state(driver) == "done", driver.find_element(By.ID, "status").text
        rows = driver.find_elements(By.CSS_SELECTOR, "#top tr")[1:]
        assert len(rows) == min(5, len(classes)) and rows[0].text.split()[0] in classes
        assert "threshold" in driver.find_element(By.CSS_SELECTOR, ".verdict").text
        cards = driver.find_elements(By.CSS_SELECTOR, "#neighbours .card img")
        assert len(cards) == 10 and all(c.get_attribute("src").startswith("data:image/jpeg")
                                        for c in cards)
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == []
    finally:
        driver.quit()
