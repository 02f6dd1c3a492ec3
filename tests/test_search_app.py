"""examples/search_app: the HTTP API (in-process client) and the page end to end in
headless Chromium driven by selenium: the page loads, uploading an indexed image returns
that image first, and a screenshot is saved to tests/artifacts/search_app.png."""
from __future__ import annotations

import importlib.util
import io
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("faiss")
pytest.importorskip("fastapi")
pytest.importorskip("multipart", reason="python-multipart is needed for uploads (extra 'app')")

from sslfeatures import Encoder, Index  # noqa: E402

APP_FILE = Path(__file__).resolve().parents[1] / "examples" / "search_app" / "app.py"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")


def _load_app_module():
    spec = importlib.util.spec_from_file_location("search_app", APP_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def index(tiny_images) -> Index:
    enc = Encoder.random_init("resnet18", image_size=32, stem="small_s2",
                              backbone_kwargs={"channels": [8, 16, 32, 64]}, device="cpu")
    return Index.build(enc, tiny_images, progress=False)


@pytest.fixture(scope="module")
def app(index):
    return _load_app_module().create_app(index, k=5)


def test_api_search_thumbnails_and_errors(app, index, tiny_images):
    from fastapi.testclient import TestClient

    client = TestClient(app)
    assert "drop a query image" in client.get("/").text.lower()
    info = client.get("/api/info").json()
    assert info == {**info, "entries": 48, "kind": "flat", "metric": "cosine", "default_k": 5}
    query = sorted(tiny_images.rglob("*.png"))[9]
    r = client.post("/api/search", files={"file": (query.name, query.read_bytes(), "image/png")}, data={"k": "4"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [h["rank"] for h in body["results"]] == [1, 2, 3, 4]
    first = body["results"][0]
    assert first["path"] == os.path.abspath(query) and first["score"] == pytest.approx(1.0, abs=1e-4)
    thumb = client.get(first["thumb"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(thumb.content)).size == (64, 64)
    assert client.get("/thumb/123456").status_code == 404
    bad = client.post("/api/search", files={"file": ("x.png", b"not an image", "image/png")})
    assert bad.status_code == 400 and "not a recognised image format" in bad.json()["detail"]
    assert client.post("/api/search", files={"file": ("x.png", b"", "image/png")}).status_code == 400
    too_many = client.post("/api/search", files={"file": (query.name, query.read_bytes(), "image/png")},
                           data={"k": "1000"})
    assert too_many.status_code == 422


def test_app_refuses_an_index_without_encoder(index, tmp_path):
    path = index.save(tmp_path / "x.index")
    with pytest.raises(ValueError, match="no encoder attached"):
        _load_app_module().create_app(Index.load(path, load_encoder=False))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(app):
    uvicorn = pytest.importorskip("uvicorn")
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        if time.time() > deadline or not thread.is_alive():
            pytest.fail("the search app did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def browser(tmp_path):
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.skip(f"headless Chromium not installed ({CHROMIUM} and {CHROMEDRIVER} are needed; on Debian: "
                    "apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1200,900", f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_browser_upload_shows_the_query_image_first(server, browser, tiny_images):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60)
    browser.get(server + "/")
    assert browser.title == "sslfeatures image search"
    wait.until(lambda d: "48 images" in d.find_element(By.ID, "info").text)
    query = sorted(tiny_images.rglob("*.png"))[17]
    browser.find_element(By.ID, "file").send_keys(str(query))
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") in ("done", "error"))
    assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done", \
        browser.find_element(By.ID, "status").text
    cards = browser.find_elements(By.CSS_SELECTOR, "#results .result")
    assert len(cards) == 5
    assert cards[0].get_attribute("data-path") == os.path.abspath(query)
    assert float(cards[0].get_attribute("data-score")) == pytest.approx(1.0, abs=1e-4)
    scores = [float(c.get_attribute("data-score")) for c in cards]
    assert scores == sorted(scores, reverse=True)
    # every thumbnail was fetched and decoded by the browser
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#results .result img")))
    wait.until(lambda d: all(d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img)
                             for img in d.find_elements(By.CSS_SELECTOR, "#results .result img")))
    assert "5 results" in browser.find_element(By.ID, "status").text
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "search_app.png"
    assert browser.save_screenshot(str(shot))
    assert Image.open(shot).size[0] > 0
