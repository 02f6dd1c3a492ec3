"""A small image-search web app over an :class:`sslfeatures.Index`: drop a query image on
the page, see the ``k`` nearest indexed images with their scores.

    sslfeatures index build --model runs/simclr-.../ --data photos/ --out photos.index
    python examples/search_app/app.py --index photos.index [--model runs/simclr-.../] [--port 8000]

then open http://127.0.0.1:8000/. Needs the ``app`` extra (``pip install
'sslfeatures[app,search]'``: FastAPI, uvicorn, python-multipart).

Endpoints: ``GET /`` the page (``static/index.html``, plain HTML + JavaScript), ``GET
/api/info`` the index's size and kind, ``POST /api/search`` (multipart ``file`` + ``k``) the
hits as JSON, ``GET /thumb/{id}`` a thumbnail of an indexed image. Only images that are in
the index are ever served.
"""
from __future__ import annotations

import argparse
import io
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, Form, HTTPException, UploadFile
from fastapi.responses import HTMLResponse, Response
from PIL import Image
from starlette.concurrency import run_in_threadpool

from sslfeatures import Index
from sslfeatures.data.decode import DecodeError, decode_bytes, load_pil

STATIC = Path(__file__).resolve().parent / "static"
MAX_K = 100


def _decode_upload(data: bytes, name: str) -> Image.Image:
    """An uploaded file as an upright RGB image, or ``ValueError`` saying why not."""
    if not data:
        raise ValueError(f"{name}: empty upload")
    try:
        return decode_bytes(data)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


class _Thumbnails:
    """PNG thumbnails of indexed images, least-recently-used cache."""

    def __init__(self, size: int = 160, capacity: int = 2048):
        self.size, self.capacity = size, capacity
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: str) -> bytes:
        with self._lock:
            if path in self._cache:
                self._cache.move_to_end(path)
                return self._cache[path]
        img = load_pil(path)
        img.thumbnail((self.size, self.size), Image.BICUBIC)
        if min(img.size) < 64:  # tiny images (e.g. 28 px) are enlarged so they can be seen
            scale = 64 / min(img.size)
            img = img.resize((round(img.width * scale), round(img.height * scale)), Image.NEAREST)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        data = buf.getvalue()
        with self._lock:
            self._cache[path] = data
            if len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return data


def create_app(index: Index, k: int = 10, max_upload_mb: float = 20.0) -> FastAPI:
    """The FastAPI application serving ``index`` (which needs an encoder attached)."""
    if index.encoder is None:
        raise ValueError("the index has no encoder attached, so image queries cannot be embedded: "
                         "load it with Index.load(path, encoder=...)")
    default_k = k
    app = FastAPI(title="sslfeatures image search")
    thumbs = _Thumbnails()
    lock = threading.Lock()  # one query at a time through the encoder
    page = (STATIC / "index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    def home() -> str:
        return page

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        return {"entries": len(index), "kind": index.kind, "metric": index.metric, "dim": index.dim,
                "encoder": index.encoder_path, "default_k": default_k, "max_k": MAX_K}

    @app.post("/api/search")
    async def search(file: UploadFile = File(...),  # noqa: B008 - FastAPI's dependency-injection idiom
                     k: int = Form(default_k)) -> dict[str, Any]:
        if not 1 <= k <= MAX_K:
            raise HTTPException(422, f"k must be between 1 and {MAX_K}, got {k}")
        data = await file.read(int(max_upload_mb * 2**20) + 1)
        if len(data) > max_upload_mb * 2**20:
            raise HTTPException(413, f"upload larger than {max_upload_mb:g} MB")
        name = file.filename or "upload"
        try:
            img = _decode_upload(data, name)
        except ValueError as e:
            raise HTTPException(400, str(e)) from None
        def run() -> list:
            with lock:
                return index.search(img, k=k)

        t0 = time.perf_counter()
        hits = await run_in_threadpool(run)  # embedding is CPU work: keep the event loop free
        ms = (time.perf_counter() - t0) * 1000
        results = []
        for rank, h in enumerate(hits, 1):
            i = index.id_of(h.path)
            results.append({"rank": rank, "id": i, "path": h.path, "name": os.path.basename(h.path),
                            "score": round(h.score, 6), "thumb": f"/thumb/{i}"})
        return {"query": name, "k": k, "metric": index.metric, "ms": round(ms, 2), "results": results}

    @app.get("/thumb/{id_}")
    def thumb(id_: int) -> Response:
        try:
            path = index.path_of(id_)
        except KeyError:
            raise HTTPException(404, f"no indexed image with id {id_}") from None
        try:
            data = thumbs.get(path)
        except DecodeError as e:
            raise HTTPException(404, f"indexed image cannot be read: {e.reason}") from None
        return Response(data, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", required=True, help="index file written by Index.save / 'sslfeatures index build'")
    ap.add_argument("--model", help="encoder for the queries (default: the one the index was built with)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    args = ap.parse_args()
    import uvicorn

    index = Index.load(args.index, encoder=args.model)
    print(f"serving {index} on http://{args.host}:{args.port}/")
    uvicorn.run(create_app(index, k=args.k), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
