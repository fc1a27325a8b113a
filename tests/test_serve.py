"""`tokenret serve`: the HTTP API over a small index, queried with urllib."""

from __future__ import annotations

import io
import json
import tempfile
import threading
import urllib.error
import urllib.request
from importlib import resources

import numpy as np
import pytest
from PIL import Image

import tokenret
from tokenret.collection import ImageIndex
from tokenret.extraction import ExtractionConfig
from tokenret.serve import SearchServer, SearchService

TINY = {"backbone": "resnet18", "dim": 32, "num_heads": 4, "out_dim": 16}
# no proxy, whatever the environment says: the server is on this machine
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def generated_image(seed: int) -> Image.Image:
    """A 96x64 picture: a coloured gradient with a few rectangles, different for each seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:64, 0:96]
    base = rng.uniform(0, 255, 3)[None, None] * (x[..., None] / 96) + rng.uniform(0, 80, 3)
    for _ in range(3):
        x0, y0 = rng.integers(0, 70), rng.integers(0, 40)
        base[y0 : y0 + 20, x0 : x0 + 25] = rng.uniform(0, 255, 3)
    return Image.fromarray(base.clip(0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server on a free port over an index of 6 generated images (tiny random model)."""
    import torch

    root = tmp_path_factory.mktemp("serve")
    photos = root / "photos"
    photos.mkdir()
    for i in range(6):
        generated_image(i).save(photos / f"img{i}.png")
    torch.manual_seed(0)
    model = tokenret.create_model("token_r50", **TINY)
    with ImageIndex.create(root / "idx", model, ExtractionConfig(max_size=64, scales=(1.0,))) as index:
        index.sync(photos, model, progress=False, num_workers=0)
    service = SearchService.open(root / "idx", device="cpu")  # the index's own model, loaded once
    srv = SearchServer(service, "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    service.close()


def call(server, path, data=None, content_type=None):
    """(status, parsed JSON or raw bytes, headers) of a request; error statuses are returned, not raised."""
    headers = {"Content-Type": content_type} if content_type else {}
    req = urllib.request.Request(server.url.rstrip("/") + path, data=data, headers=headers)
    try:
        with OPENER.open(req, timeout=60) as r:
            status, body, h = r.status, r.read(), r.headers
    except urllib.error.HTTPError as e:
        status, body, h = e.code, e.read(), e.headers
    return status, json.loads(body) if h.get_content_type() == "application/json" else body, h


def multipart(fields: dict[str, bytes | str]) -> tuple[bytes, str]:
    boundary = "tokenret-test-boundary"
    out = b""
    for name, value in fields.items():
        filename = '; filename="q.png"' if isinstance(value, bytes) else ""
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"{filename}\r\n\r\n'.encode()
        out += (value if isinstance(value, bytes) else value.encode()) + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def photo(server, i):
    return server.service.index.path.parent / "photos" / f"img{i}.png"


def test_self_query_finds_itself_with_the_python_api_score(server):
    query = photo(server, 2)
    status, answer, _ = call(server, "/search?k=3", query.read_bytes(), "image/png")
    assert status == 200 and len(answer["results"]) == 3
    with ImageIndex(server.service.index.path) as index:
        want = index.search_images([query], server.service.model, k=3, num_workers=0, device="cpu")[0]
    got = answer["results"]
    assert got[0]["path"] == str(query.resolve())
    assert [(r["path"], r["id"]) for r in got] == [(h.path, h.id) for h in want]
    np.testing.assert_allclose([r["score"] for r in got], [h.score for h in want], rtol=0, atol=1e-6)
    # The same through the web page's form, with a box: matches search_images with that box.
    body, ctype = multipart({"image": query.read_bytes(), "k": "2", "box": "10,5,80,60"})
    status, answer, _ = call(server, "/search", body, ctype)
    with ImageIndex(server.service.index.path) as index:
        want = index.search_images(
            [query], server.service.model, k=2, boxes=[(10, 5, 80, 60)], num_workers=0, device="cpu"
        )[0]
    assert status == 200 and answer["box"] == [10, 5, 80, 60]
    assert [r["id"] for r in answer["results"]] == [h.id for h in want]
    np.testing.assert_allclose([r["score"] for r in answer["results"]], [h.score for h in want], atol=1e-6)


def test_image_serves_only_files_in_the_index(server):
    with ImageIndex(server.service.index.path) as index:
        ids = dict(index.db.execute("SELECT path, id FROM images"))
    image_id = ids[str(photo(server, 1).resolve())]
    status, body, headers = call(server, f"/image?id={image_id}")
    assert status == 200 and body == photo(server, 1).read_bytes()
    assert headers.get_content_type() == "image/png"
    status, body, headers = call(server, f"/image?id={image_id}&size=32")
    assert status == 200 and headers.get_content_type() == "image/jpeg"
    assert max(Image.open(io.BytesIO(body)).size) == 32
    for path, code, words in [
        (f"/image?id={max(ids.values()) + 1}", 404, "no image with id"),
        ("/image?id=../../etc/passwd", 400, "id must be an integer"),
        ("/image?path=/etc/passwd", 400, "id must be an integer"),
        (f"/image?id={image_id}&size=100000", 400, "size must be"),
    ]:
        status, answer, _ = call(server, path)
        assert status == code and words in answer["error"], path


def test_bad_requests_get_400s_and_the_server_keeps_answering(server, monkeypatch):
    good = photo(server, 0).read_bytes()
    cases = [
        (good[: len(good) // 3], "image/png", "not a readable image"),  # corrupt: truncated PNG
        (b"\x89PNG\r\n\x1a\n" + bytes(200), "image/png", "not an image"),
        (b"hello, not an image", "application/octet-stream", "not an image"),
        (b"", "image/png", "empty upload"),
    ]
    for data, ctype, words in cases:
        status, answer, _ = call(server, "/search", data, ctype)
        assert status == 400 and words in answer["error"], words
    for query, words in [("k=0", "k must be an integer from 1 to 1000"), ("k=ten", "k must be"),
                         ("box=0,0,200,50", "outside the image"), ("box=1,2,3", "a box is x0,y0,x1,y1"),
                         ("box=50,10,20,40", "outside the image")]:  # fmt: skip
        status, answer, _ = call(server, "/search?" + query, good, "image/png")
        assert status == 400 and words in answer["error"], query
    status, answer, _ = call(server, "/search", good, "text/plain")
    assert status == 415 and "multipart/form-data" in answer["error"]
    body, ctype = multipart({"picture": good})
    assert call(server, "/search", body, ctype)[1]["error"] == "the form has no 'image' field"
    monkeypatch.setattr(server.service, "max_upload_bytes", len(good) - 1)
    status, answer, _ = call(server, "/search", good, "image/png")
    assert status == 413 and f"has {len(good)} bytes; the limit is {len(good) - 1} bytes" in answer["error"]
    monkeypatch.undo()

    def broken(*args):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(server.service, "search", broken)
    status, answer, _ = call(server, "/search", good, "image/png")
    assert status == 500 and "disk on fire" in answer["error"]
    monkeypatch.undo()
    assert call(server, "/health")[0] == 200
    status, answer, _ = call(server, "/search?k=1", good, "image/png")
    assert status == 200 and answer["results"][0]["path"] == str(photo(server, 0).resolve())


def test_health_and_page(server):
    status, health, _ = call(server, "/health")
    assert status == 200
    assert health["images"] == 6 and health["model"] == "token_r50" and health["dim"] == 16
    assert health["model_kwargs"] == TINY
    assert (health["backend"], health["spec"], health["refine"], health["ann"]) == (
        "auto",
        "exact",
        None,
        "exact",
    )
    assert health["max_upload_bytes"] == 32 * 1024 * 1024
    status, page, headers = call(server, "/")
    assert status == 200 and headers.get_content_type() == "text/html"
    assert b'<input type="file" name="image"' in page and b'fetch("/search"' in page
    status, answer, _ = call(server, "/nowhere")
    assert status == 404 and "/health" in answer["error"]


def test_page_is_the_package_data_file(server):
    """GET / serves static/index.html as shipped in the package (what pyproject's package-data installs)."""
    from tokenret.serve.page import PAGE_RESOURCE, index_html

    shipped = resources.files("tokenret.serve").joinpath(PAGE_RESOURCE)
    assert shipped.is_file() and PAGE_RESOURCE == "static/index.html"
    status, page, headers = call(server, "/")
    assert status == 200 and headers.get_param("charset") == "utf-8"
    assert page == shipped.read_bytes() == index_html()
    assert page.decode("utf-8").startswith("<!doctype html>") and page.rstrip().endswith(b"</html>")


def test_search_decodes_the_upload_in_memory(server, tmp_path, monkeypatch):
    """Searches write no temporary file: with no usable temporary folder they still answer, as before."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-folder"))
    with pytest.raises(FileNotFoundError):
        tempfile.mkdtemp()
    good = photo(server, 4).read_bytes()
    status, answer, _ = call(server, "/search?k=1", good, "image/png")
    assert status == 200 and answer["results"][0]["path"] == str(photo(server, 4).resolve())
    status, answer, _ = call(server, "/search", good[: len(good) // 3], "image/png")
    assert status == 400 and "not a readable image" in answer["error"]
