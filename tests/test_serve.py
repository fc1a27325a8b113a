"""`tokenret serve`: the HTTP API (FastAPI on uvicorn) over a small index, queried with urllib and raw
sockets: searches, micro-batching, limits, timeouts, the API key, and what a client may learn."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from served_index import TINY, generated_image, make_index
from tokenret.collection import ImageIndex
from tokenret.serve import Limits, SearchServer, SearchService

LIMITS = Limits(idle_timeout=1.0, body_timeout=4.0)
# no proxy, whatever the environment says: the server is on this machine
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server on a free port over an index of 6 generated images (tiny random model)."""
    root = tmp_path_factory.mktemp("serve")
    make_index(root)
    service = SearchService.open(root / "idx", device="cpu")  # the index's own model, loaded once
    with SearchServer(service, "127.0.0.1", 0, limits=LIMITS) as srv:
        yield srv
    service.close()


def call(server, path, data=None, content_type=None, method=None, headers=None):
    """(status, parsed JSON or raw bytes, headers) of a request; error statuses are returned, not raised."""
    headers = dict(headers or {})
    if content_type:
        headers["Content-Type"] = content_type
    req = urllib.request.Request(server.url.rstrip("/") + path, data=data, headers=headers, method=method)
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


def ids_by_name(server):
    with ImageIndex(server.service.index.path) as index:
        return {Path(p).name: i for p, i in index.db.execute("SELECT path, id FROM images")}


def raw_request(server, data: bytes, timeout: float = 30) -> bytes:
    """Send ``data`` as is on a new connection; everything the server answers until it closes."""
    host, port = server.socket.getsockname()[:2]
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


def json_of(raw: bytes) -> dict:
    return json.loads(raw.split(b"\r\n\r\n", 1)[1])


def test_self_query_finds_itself_with_the_python_api_score(server):
    query = photo(server, 2)
    status, answer, _ = call(server, "/search?k=3", query.read_bytes(), "image/png")
    assert status == 200 and len(answer["results"]) == 3
    with ImageIndex(server.service.index.path) as index:
        want = index.search_images([query], server.service.model, k=3, num_workers=0, device="cpu")[0]
    got = answer["results"]
    # results name files relative to the indexed folder, never by the server's absolute path
    assert got[0]["name"] == "img2.png" and set(got[0]) == {"id", "name", "score"}
    assert [(r["name"], r["id"]) for r in got] == [(Path(h.path).name, h.id) for h in want]
    np.testing.assert_allclose([r["score"] for r in got], [h.score for h in want], rtol=0, atol=1e-6)
    # The same through the web page's form, with a box: matches search_images with that box.
    body, ctype = multipart({"image": query.read_bytes(), "k": "2", "box": "10,5,80,60"})
    status, answer, _ = call(server, "/search", body, ctype)
    with ImageIndex(server.service.index.path) as index:
        want = index.search_images(
            [query], server.service.model, k=2, boxes=[(10, 5, 80, 60)], num_workers=0, device="cpu"
        )[0]
    assert status == 200 and answer["box"] == [10, 5, 80, 60] and answer["query_size"] == [96, 64]
    assert [r["id"] for r in answer["results"]] == [h.id for h in want]
    np.testing.assert_allclose([r["score"] for r in answer["results"]], [h.score for h in want], atol=1e-6)


def test_search_by_id_uses_the_stored_vector_and_with_a_box_the_file(server):
    ids = ids_by_name(server)
    status, by_id, _ = call(server, f"/search?id={ids['img3.png']}&k=6", b"", None, method="POST")
    status2, by_file, _ = call(server, "/search?k=6", photo(server, 3).read_bytes(), "image/png")
    assert status == status2 == 200 and by_id["query_id"] == ids["img3.png"]
    assert [r["id"] for r in by_id["results"]] == [r["id"] for r in by_file["results"]]
    # stored vectors are float16: the scores agree to that rounding
    np.testing.assert_allclose(
        [r["score"] for r in by_id["results"]], [r["score"] for r in by_file["results"]], atol=2e-3
    )
    body, ctype = multipart({"id": str(ids["img3.png"]), "box": "10,5,80,60", "k": "2"})
    status, boxed, _ = call(server, "/search", body, ctype)
    body, ctype = multipart({"image": photo(server, 3).read_bytes(), "box": "10,5,80,60", "k": "2"})
    assert status == 200 and boxed["results"] == call(server, "/search", body, ctype)[1]["results"]
    status, answer, _ = call(server, "/search?id=999999&k=2", b"", None, method="POST")
    assert status == 404 and "no image with id 999999" in answer["error"]
    body, ctype = multipart({"id": "1", "image": photo(server, 3).read_bytes()})
    assert call(server, "/search", body, ctype)[0] == 400


def test_concurrent_searches_are_batched_and_answer_as_alone(server):
    """Eight clients at once: fewer forward passes than queries, each answer equal to the query alone."""
    queries = [photo(server, i % 6).read_bytes() for i in range(8)]
    alone = [call(server, "/search?k=3", q, "image/png")[1]["results"] for q in queries]
    before = server.service.batcher.stats()
    answers = [None] * len(queries)
    gate = threading.Barrier(len(queries))

    def client(i):
        gate.wait()
        answers[i] = call(server, "/search?k=3", queries[i], "image/png")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(queries))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = server.service.batcher.stats()
    assert all(a[0] == 200 for a in answers)
    for got, want in zip(answers, alone, strict=True):
        assert [r["id"] for r in got[1]["results"]] == [r["id"] for r in want]
        np.testing.assert_allclose(
            [r["score"] for r in got[1]["results"]], [r["score"] for r in want], atol=1e-5
        )
    assert after["items"] - before["items"] == len(queries)
    assert after["batches"] - before["batches"] < len(queries)  # some shared a forward pass
    assert after["largest_batch"] > 1


def test_a_full_queue_answers_503_at_once(server, monkeypatch):
    """With the worker busy and the queue full, a search is refused at once, not left to time out."""
    entered, release = threading.Event(), threading.Event()
    original = server.service.batcher.run

    def slow(items):
        entered.set()
        release.wait(20)
        return original(items)

    monkeypatch.setattr(server.service.batcher, "run", slow)
    monkeypatch.setattr(server.service.batcher.queue, "maxsize", 1)
    good = photo(server, 0).read_bytes()
    results = []

    def held():
        results.append(call(server, "/search?k=1", good, "image/png")[0])

    first = threading.Thread(target=held)
    first.start()
    assert entered.wait(20)  # the worker is busy with the first search
    second = threading.Thread(target=held)
    second.start()
    deadline = time.monotonic() + 10
    while server.service.batcher.queue.qsize() < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    start = time.perf_counter()
    status, answer, _ = call(server, "/search?k=1", good, "image/png")
    assert status == 503 and "busy" in answer["error"] and time.perf_counter() - start < 2
    release.set()
    first.join()
    second.join()
    assert results == [200, 200]


def test_image_serves_only_the_file_that_was_indexed(server, tmp_path):
    ids = ids_by_name(server)
    image_id = ids["img1.png"]
    status, body, headers = call(server, f"/image?id={image_id}")
    assert status == 200 and body == photo(server, 1).read_bytes()
    assert headers.get_content_type() == "image/png"
    status, body, headers = call(server, f"/image?id={image_id}&size=32")
    assert status == 200 and headers.get_content_type() == "image/jpeg"
    assert max(Image.open(io.BytesIO(body)).size) == 32
    for path, code, words in [
        (f"/image?id={max(ids.values()) + 1}", 404, "no image with id"),
        ("/image?id=../../etc/passwd", 400, "id must be an integer"),
        ("/image?id=99999999999999999999999", 400, "id must be an integer"),  # was a 500 with the exception
        ("/image?path=/etc/passwd", 400, "bad request"),
        (f"/image?id={image_id}&size=100000", 400, "size must be"),
    ]:
        status, answer, _ = call(server, path)
        assert status == code and words in answer["error"], path
    # the indexed file replaced: by a symlink out of the folder (same size and time), by other bytes,
    # by a named pipe: 404, never the new target, never a hang
    target = photo(server, 5)
    saved, st = target.read_bytes(), target.stat()
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"S" * len(saved))
    os.utime(secret, ns=(st.st_atime_ns, st.st_mtime_ns))
    try:
        target.unlink()
        target.symlink_to(secret)
        for path in (f"/image?id={ids['img5.png']}", f"/image?id={ids['img5.png']}&size=64"):
            status, answer, _ = call(server, path)
            assert (
                status == 404
                and "no longer available" in answer["error"]
                and b"S" * 8 not in str(answer).encode()
            )
            assert str(tmp_path) not in answer["error"] and str(target) not in answer["error"]
        target.unlink()
        target.write_bytes(saved[:-1] + b"\0")  # same size, another time
        assert call(server, f"/image?id={ids['img5.png']}")[0] == 404
        target.unlink()
        os.mkfifo(target)
        assert call(server, f"/image?id={ids['img5.png']}")[0] == 404
    finally:
        target.unlink()
        target.write_bytes(saved)
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert call(server, f"/image?id={ids['img5.png']}")[1] == saved


def test_errors_are_json_without_internals(server, monkeypatch, caplog):
    good = photo(server, 0).read_bytes()
    cases = [
        (good[: len(good) // 3], "image/png", 400, "not a readable image"),  # corrupt: truncated PNG
        (b"\x89PNG\r\n\x1a\n" + bytes(200), "image/png", 400, "not an image"),
        (b"hello, not an image", "application/octet-stream", 400, "not an image"),
        (b"", "image/png", 400, "empty upload"),
        (good, "text/plain", 415, "multipart/form-data"),
    ]
    for data, ctype, code, words in cases:
        status, answer, _ = call(server, "/search", data, ctype)
        assert status == code and words in answer["error"], words
    bad_queries = [
        ("k=0", "k must be an integer from 1 to 1000"),
        ("k=ten", "k must be"),
        ("box=0,0,200,50", "outside the image"),
        ("box=1,2,3", "a box is x0,y0,x1,y1"),
        ("box=50,10,20,40", "outside the image"),
        ("box_frame=sideways", "box_frame"),
    ]
    for query, words in bad_queries:
        status, answer, _ = call(server, "/search?" + query, good, "image/png")
        assert status == 400 and words in answer["error"], query
    body, ctype = multipart({"picture": good})
    assert call(server, "/search", body, ctype)[1]["error"].startswith("no query")
    wrong = [
        ("DELETE", "/search", 405),
        ("OPTIONS", "/health", 405),
        ("GET", "/nowhere", 404),
        ("PUT", "/image", 405),
        ("GET", "/search", 405),
    ]
    for method, path, code in wrong:
        status, answer, headers = call(server, path, method=method)
        assert status == code and headers.get_content_type() == "application/json" and answer["error"]
    monkeypatch.setattr(server.service.index, "search", lambda *a, **kw: 1 / 0)
    status, answer, _ = call(server, "/search", good, "image/png")
    assert status == 500 and answer == {"error": "internal error (the details are in the server's log)"}
    monkeypatch.undo()
    assert call(server, "/health")[0] == 200
    status, answer, _ = call(server, "/search?k=1", good, "image/png")
    assert status == 200 and answer["results"][0]["name"] == "img0.png"


def test_health_shows_names_not_paths(server):
    status, health, _ = call(server, "/health")
    assert status == 200
    assert health["images"] == 6 and health["model"] == "token_r50" and health["dim"] == 16
    assert health["model_kwargs"] == TINY and health["index"] == "idx" and health["attention"] is True
    assert (health["backend"], health["spec"], health["refine"], health["ann"]) == (
        "auto",
        "exact",
        None,
        "exact",
    )
    assert health["max_upload_bytes"] == 32 * 1024 * 1024 and health["max_pixels"] == 40_000_000
    assert str(server.service.index.path.parent) not in json.dumps(health)
    status, spec, _ = call(server, "/openapi.json")
    assert status == 200 and {"/search", "/attention", "/image", "/health"} <= set(spec["paths"])
    assert "multipart/form-data" in spec["paths"]["/search"]["post"]["requestBody"]["content"]


def test_page_is_the_package_data_file(server):
    """GET / serves static/index.html as shipped in the package (what pyproject's package-data installs)."""
    from tokenret.serve.page import PAGE_RESOURCE, index_html

    shipped = resources.files("tokenret.serve").joinpath(PAGE_RESOURCE)
    assert shipped.is_file() and PAGE_RESOURCE == "static/index.html"
    status, page, headers = call(server, "/")
    assert status == 200 and headers.get_param("charset") == "utf-8"
    assert page == shipped.read_bytes() == index_html()
    assert page.decode("utf-8").lower().startswith("<!doctype html>") and page.rstrip().endswith(b"</html>")
    assert b"http://" not in page and b"https://" not in page  # nothing from elsewhere: works offline


def test_search_decodes_the_upload_in_memory(server, tmp_path, monkeypatch):
    """Searches write no temporary file: with no usable temporary folder they still answer, as before."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-folder"))
    with pytest.raises(FileNotFoundError):
        tempfile.mkdtemp()
    good = photo(server, 4).read_bytes()
    status, answer, _ = call(server, "/search?k=1", good, "image/png")
    assert status == 200 and answer["results"][0]["name"] == "img4.png"
    body, ctype = multipart({"image": good, "k": "1"})
    status, answer, _ = call(server, "/search", body, ctype)
    assert status == 200 and answer["results"][0]["name"] == "img4.png"


def test_uploads_are_bounded_as_they_stream(server, monkeypatch):
    good = photo(server, 0).read_bytes()
    # announced over the limit: refused before reading
    raw = raw_request(server, b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                      b"Content-Length: 999999999\r\nConnection: close\r\n\r\n" + good[:100])  # fmt: skip
    assert status_of(raw) == 413 and "limit" in json_of(raw)["error"]
    # chunked (no length announced): counted as it streams
    monkeypatch.setattr(server.service, "max_upload_bytes", 3000)
    chunks = b"".join(b"%x\r\n%s\r\n" % (1000, b"x" * 1000) for _ in range(5)) + b"0\r\n\r\n"
    raw = raw_request(server, b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                      b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunks)  # fmt: skip
    assert status_of(raw) == 413 and "over the limit of 3000 bytes" in json_of(raw)["error"]
    monkeypatch.undo()
    # a multipart body of 50k tiny parts: refused at the field limit, quickly
    boundary = b"b"
    parts = b"".join(
        b'--b\r\nContent-Disposition: form-data; name="f%d"\r\n\r\nx\r\n' % i for i in range(50_000)
    )
    start = time.process_time()
    status, answer, _ = call(
        server, "/search", parts + b"--b--\r\n", "multipart/form-data; boundary=" + boundary.decode()
    )
    assert status == 400 and "malformed multipart" in answer["error"]
    assert time.process_time() - start < 5


def test_pixels_are_bounded_before_decoding(server, monkeypatch):
    """A small PNG of 9000x9000 pixels is refused from its header: no decode."""
    big = io.BytesIO()
    Image.new("L", (9000, 9000)).save(big, "PNG")
    assert len(big.getvalue()) < 200_000
    import tokenret.data.images as images

    monkeypatch.setattr(images, "to_rgb", lambda *a: pytest.fail("the bomb was decoded"))
    start = time.perf_counter()
    status, answer, _ = call(server, "/search", big.getvalue(), "image/png")
    assert status == 413 and "9000x9000 pixels; the limit is 40000000" in answer["error"]
    assert time.perf_counter() - start < 2


def test_a_stalled_upload_times_out_and_others_are_served_meanwhile(server):
    """A client that announces a body and stops sending holds nothing for long: 408 after the idle timeout,
    and other searches are answered while it waits."""
    host, port = server.socket.getsockname()[:2]
    slow = []
    for _ in range(10):
        s = socket.create_connection((host, port), timeout=30)
        head = b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 500000\r\n"
        s.sendall(head + b"\r\n" + b"x" * 1000)
        slow.append(s)
    start = time.perf_counter()
    status, _, _ = call(server, "/search?k=1", photo(server, 1).read_bytes(), "image/png")
    assert status == 200 and time.perf_counter() - start < LIMITS.idle_timeout + 5
    for s in slow:
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
        s.close()
        assert status_of(raw) == 408 and "stalled" in json_of(raw)["error"]
    assert time.perf_counter() - start < LIMITS.idle_timeout + 10


def test_connections_are_capped(server, tmp_path):
    """Beyond the connection limit, a request gets 503 at once."""
    service = server.service
    with SearchServer(service, "127.0.0.1", 0, limits=Limits(max_connections=4)) as small:
        host, port = small.socket.getsockname()[:2]
        idle = [socket.create_connection((host, port), timeout=10) for _ in range(4)]
        for s in idle:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # headers never finished
        time.sleep(0.2)
        status, answer, _ = call(small, "/health")
        assert status == 503
        for s in idle:
            s.close()
        time.sleep(0.2)
        assert call(small, "/health")[0] == 200


def test_a_client_that_goes_away_leaves_no_traceback(server, caplog):
    host, port = server.socket.getsockname()[:2]
    good = photo(server, 2).read_bytes()
    caplog.set_level(logging.INFO)
    for _ in range(3):
        s = socket.create_connection((host, port), timeout=10)
        head = b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        s.sendall(head + b"Content-Length: %d\r\n\r\n%s" % (len(good), good))
        s.close()  # before the answer
    time.sleep(1.0)
    assert call(server, "/search?k=1", good, "image/png")[0] == 200
    assert "Traceback" not in caplog.text and "BrokenPipe" not in caplog.text


def test_api_key_is_required_on_every_request(server):
    service = server.service
    with SearchServer(service, "127.0.0.1", 0, api_key="s3cret") as locked:
        for path in ("/", "/health", "/image?id=1", "/openapi.json", "/docs"):
            status, answer, headers = call(locked, path)
            assert status == 401 and "API key" in answer["error"], path
            assert headers["WWW-Authenticate"].startswith("Basic")
        status, _, _ = call(locked, "/health", headers={"X-API-Key": "wrong"})
        assert status == 401
        basic = base64.b64encode(b"anyone:s3cret").decode()
        for h in (
            {"X-API-Key": "s3cret"},
            {"Authorization": "Bearer s3cret"},
            {"Authorization": f"Basic {basic}"},
        ):
            assert call(locked, "/health", headers=h)[0] == 200, h
        status, answer, _ = call(locked, "/search?k=1", photo(server, 0).read_bytes(), "image/png",
                                 headers={"X-API-Key": "s3cret"})  # fmt: skip
        assert status == 200 and answer["results"][0]["name"] == "img0.png"


def test_serving_beyond_this_machine_without_a_key_warns(capsys, monkeypatch):
    from tokenret.serve import http

    assert http.is_loopback("127.0.0.1") and http.is_loopback("::1") and http.is_loopback("localhost")
    assert not http.is_loopback("0.0.0.0") and not http.is_loopback("192.168.1.4")

    class Stop(Exception):
        pass

    def no_index(*a, **kw):
        raise Stop

    monkeypatch.setattr(http.SearchService, "open", no_index)
    monkeypatch.delenv(http.API_KEY_ENV, raising=False)
    with pytest.raises(Stop):
        http.serve("idx", host="0.0.0.0")
    assert "no authentication" in capsys.readouterr().err
    for host, key, env in [("127.0.0.1", None, None), ("0.0.0.0", "k", None), ("0.0.0.0", None, "k")]:
        if env:
            monkeypatch.setenv(http.API_KEY_ENV, env)
        with pytest.raises(Stop):
            http.serve("idx", host=host, api_key=key)
        assert "no authentication" not in capsys.readouterr().err


def test_attention_maps_of_the_query(server):
    good = photo(server, 1).read_bytes()
    status, answer, _ = call(server, "/attention", good, "image/png")
    assert status == 200 and len(answer["maps"]) == server.service.model.tr.num_tokens == 4
    first = base64.b64decode(answer["maps"][0].split(",", 1)[1])
    assert Image.open(io.BytesIO(first)).size == (96, 64)
    body, ctype = multipart({"image": good, "box": "10,5,80,60"})
    status, answer, _ = call(server, "/attention", body, ctype)
    assert status == 200 and Image.open(
        io.BytesIO(base64.b64decode(answer["maps"][0].split(",", 1)[1]))
    ).size == (70, 55)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_box_drawn_on_the_upright_image_is_the_same_region_of_the_stored_one(orientation):
    from tokenret.data.images import _ORIENTATION_TRANSPOSE, stored_box, upright_size

    rng = np.random.default_rng(orientation)
    stored = Image.fromarray(rng.integers(0, 255, (30, 50, 3), dtype=np.uint8))
    upright = stored.transpose(_ORIENTATION_TRANSPOSE[orientation]) if orientation > 1 else stored
    assert upright.size == upright_size(stored.size, orientation)
    box = (3, 7, 21, 19)
    s = stored_box(box, stored.size, orientation)
    crop = stored.crop(tuple(round(v) for v in s))
    if orientation > 1:
        crop = crop.transpose(_ORIENTATION_TRANSPOSE[orientation])
    assert np.array_equal(np.asarray(crop), np.asarray(upright.crop(box)))
    with pytest.raises(ValueError, match="outside the image"):
        stored_box((0, 0, upright.size[0] + 5, 5), stored.size, orientation)


def test_an_upload_with_exif_rotation_takes_the_box_as_shown(server):
    """A phone photo stored sideways (EXIF orientation 6): the box drawn on it as shown is the region
    searched; box_frame=stored takes the file's grid, as tokenret search --box does."""
    stored = generated_image(7).transpose(Image.Transpose.ROTATE_90)  # stored sideways: 64x96
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    stored.save(out, "PNG", exif=exif)
    data = out.getvalue()
    from tokenret.data.images import stored_box

    shown_box = "10,5,80,60"
    in_file = stored_box(shown_box.split(","), stored.size, 6)
    body, ctype = multipart({"image": data, "box": shown_box, "k": "3"})
    status, a, _ = call(server, "/search", body, ctype)
    assert status == 200 and a["query_size"] == [96, 64]
    body, ctype = multipart(
        {"image": data, "box": ",".join(f"{v:g}" for v in in_file), "box_frame": "stored", "k": "3"}
    )
    status, b, _ = call(server, "/search", body, ctype)
    assert status == 200 and a["results"] == b["results"]


def test_rerank_superglobal_as_the_python_search(server):
    """rerank=superglobal re-orders the best m exactly as ImageIndex.search(rerank=...) does, with the
    same scores; a bad setting is a 400."""
    query = photo(server, 3)
    body, ctype = multipart({"image": query.read_bytes(), "k": "5", "rerank": "superglobal", "rerank_m": "4",
                             "rerank_k": "2", "rerank_beta": "0.3"})  # fmt: skip
    status, answer, _ = call(server, "/search", body, ctype)
    assert status == 200 and answer["rerank"] == {"m": 4, "k": 2, "beta": 0.3}
    with ImageIndex(server.service.index.path) as index:
        q = index.describe_queries([query], server.service.model, num_workers=0, device="cpu")
        want = index.search(q, 5, rerank="superglobal", rerank_m=4, rerank_k=2, rerank_beta=0.3)[0]
        plain = index.search(q, 5)[0]
    assert [r["id"] for r in answer["results"]] == [h.id for h in want]
    np.testing.assert_allclose([r["score"] for r in answer["results"]], [h.score for h in want], atol=1e-5)
    assert [h.id for h in want[4:]] == [h.id for h in plain[4:]]  # beyond m: the search's own order
    ids = ids_by_name(server)
    settings = "k=5&rerank=superglobal&rerank_m=4&rerank_k=2&rerank_beta=0.3"
    status, by_id, _ = call(server, f"/search?id={ids['img3.png']}&{settings}", b"", None, method="POST")
    assert status == 200 and [r["id"] for r in by_id["results"]] == [h.id for h in want]
    bad = [
        ("rerank=magic", "unknown re-ranking"),
        ("rerank=superglobal&rerank_m=0", "m"),
        ("rerank_m=5", "need rerank=superglobal"),
        ("rerank=superglobal&rerank_beta=-1", "beta"),
    ]
    for query_string, words in bad:
        status, answer, _ = call(server, "/search?" + query_string, query.read_bytes(), "image/png")
        assert status == 400 and words in answer["error"], query_string
