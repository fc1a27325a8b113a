"""The web page of `tokenret serve` in a real browser: headless Chromium (Debian's `chromium` and
`chromium-driver`, which `.ci/run` installs) driven through selenium against a server on a free port.

The page is used as a person would: a file chosen with the picker, a box drawn with the mouse, results
clicked, attention maps opened, a file dropped on the page, refusals. What it shows is checked against the
API's own answers to the same requests (test_serve.py checks those against the Python API). Screenshots
go to the test's tmp_path (kept only when a test fails, as pytest is configured here); set
$TOKENRET_SCREENSHOT_DIR to keep copies.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from served_index import make_index
from tokenret.serve import Overloaded, SearchServer, SearchService

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
    pytest.skip("chromium/chromedriver not installed (.ci/run installs them)", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install -e .[dev])")
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

pytestmark = pytest.mark.slow  # a model, an index and a browser: ~15 s on 2 cores

WAIT_S = 60  # a search on a busy 2-core machine; the wait ends as soon as the page is ready
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # the server is on this machine


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server on a free port over an index of 6 generated 96x64 images (tiny random Token model)."""
    root = tmp_path_factory.mktemp("browser")
    make_index(root)
    service = SearchService.open(root / "idx", device="cpu")
    with SearchServer(service, "127.0.0.1", 0) as srv:  # uvicorn on a background thread
        yield srv
    service.close()


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    """Headless Chromium with a fresh profile, offline (no background networking, no updates)."""
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--window-size=1280,900", "--proxy-server=direct://",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):  # fmt: skip
        options.add_argument(arg)
    # An explicit driver path: selenium-manager never runs (it would try to download a browser).
    browser = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    browser.set_page_load_timeout(WAIT_S)
    yield browser
    browser.quit()


def api(server, path: str, fields: dict[str, bytes | str] | None = None) -> tuple[int, dict]:
    """(status, JSON) of GET path, or of a multipart POST of fields (bytes values are files)."""
    data, headers = None, {}
    if fields is not None:
        boundary = "tokenret-browser-test"
        data = b""
        for name, value in fields.items():
            filename = '; filename="upload"' if isinstance(value, bytes) else ""
            head = f'Content-Disposition: form-data; name="{name}"{filename}'
            data += f"--{boundary}\r\n{head}\r\n\r\n".encode()
            data += (value if isinstance(value, bytes) else value.encode()) + b"\r\n"
        data += f"--{boundary}--\r\n".encode()
        headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
    req = urllib.request.Request(server.url.rstrip("/") + path, data=data, headers=headers)
    try:
        with OPENER.open(req, timeout=WAIT_S) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def wait_idle(browser, what: str) -> None:
    """Wait until no request is running (the status spinner is gone and Search is enabled again)."""
    try:
        WebDriverWait(browser, WAIT_S).until(
            lambda b: (
                "busy" not in b.find_element(By.ID, "status").get_attribute("class")
                and b.find_element(By.ID, "search").is_enabled()
            )
        )
    except TimeoutException:
        pytest.fail(f"the page was still busy {WAIT_S} s after {what}")


def shown_results(browser) -> list[tuple[int, str, str]]:
    """(id, score text, file name) of each result on the page, in order."""
    return [
        (
            int(r.get_attribute("data-id")),
            r.find_element(By.CSS_SELECTOR, ".score .value").text,
            r.find_element(By.CSS_SELECTOR, ".name").text,
        )
        for r in browser.find_elements(By.CSS_SELECTOR, "#results .result")
    ]


def box_fields(browser) -> list[str]:
    return [browser.find_element(By.ID, f"box-{n}").get_attribute("value") for n in ("x0", "y0", "x1", "y1")]


def screenshot(browser, tmp_path: Path, name: str) -> Path:
    """Save the whole page as a PNG under tmp_path (and $TOKENRET_SCREENSHOT_DIR if set); print its path."""
    height, inner = browser.execute_script("return [document.documentElement.scrollHeight, innerHeight]")
    chrome = browser.get_window_size()["height"] - inner  # what the window holds besides the page
    browser.set_window_size(1280, max(900, min(int(height) + chrome, 4000)))
    path = tmp_path / name
    assert browser.save_screenshot(str(path)), "no screenshot"
    print(f"screenshot: {path}")
    if os.environ.get("TOKENRET_SCREENSHOT_DIR"):
        keep = Path(os.environ["TOKENRET_SCREENSHOT_DIR"])
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, keep / name)
        print(f"screenshot copy: {keep / name}")
    browser.set_window_size(1280, 900)
    return path


def test_upload_draw_a_box_search_and_click_a_result(server, driver, tmp_path):
    photos = server.service.index.path.parent / "photos"
    query = photos / "img2.png"
    status, health = api(server, "/health")
    assert status == 200
    driver.get(server.url)
    header = driver.find_element(By.ID, "health")
    WebDriverWait(driver, WAIT_S).until(lambda b: "images" in header.text)
    assert f"{health['images']} images" in header.text and health["model"] in header.text
    assert Path(health["index"]).name in header.text

    # Choose a file: the page shows it as uploaded and searches at once.
    driver.find_element(By.ID, "file").send_keys(str(query))
    img = driver.find_element(By.ID, "query-img")
    natural = "return [arguments[0].naturalWidth, arguments[0].naturalHeight]"
    WebDriverWait(driver, WAIT_S).until(lambda b: b.execute_script(natural, img)[0] > 0)
    assert img.get_attribute("src").startswith("blob:")  # the file itself, as uploaded
    assert driver.execute_script(natural, img) == [96, 64]
    wait_idle(driver, "choosing a file")
    status, answer = api(server, "/search", {"image": query.read_bytes()})
    assert status == 200
    shown = shown_results(driver)
    assert [(i, n) for i, _, n in shown] == [(h["id"], h["name"]) for h in answer["results"]]
    assert [s for _, s, _ in shown] == [f"{h['score']:.4f}" for h in answer["results"]]
    assert shown[0][2] == "img2.png"  # the query itself was indexed: it comes first, with its score
    assert float(shown[0][1]) == pytest.approx(1.0, abs=1e-3)

    # Draw a box with the mouse: the fields get it in the image's own pixels (the preview is scaled up).
    rect = driver.execute_script(
        "const r = arguments[0].getBoundingClientRect(); return [r.width, r.height]", img
    )
    scale = rect[0] / 96
    assert scale > 1.5 and rect[1] / 64 == pytest.approx(scale, rel=0.02)
    want = (12, 8, 70, 50)  # natural pixels
    offsets = [round(v * scale - rect[i % 2] / 2) for i, v in enumerate(want)]  # from the element's centre
    drag = ActionChains(driver).move_to_element_with_offset(img, offsets[0], offsets[1]).click_and_hold()
    drag.move_by_offset((offsets[2] - offsets[0]) // 2, (offsets[3] - offsets[1]) // 2)  # on the way
    drag.move_to_element_with_offset(img, offsets[2], offsets[3]).release().perform()
    drawn = [int(v) for v in box_fields(driver)]
    assert all(abs(d - w) <= 1 for d, w in zip(drawn, want, strict=True)), (drawn, want)
    rect_shown = driver.find_element(By.ID, "box-rect")
    assert rect_shown.is_displayed()
    assert rect_shown.size["width"] == pytest.approx((drawn[2] - drawn[0]) * scale, abs=3)
    # ... and drawing searches with the box: the same results as the API gives for it.
    wait_idle(driver, "drawing a box")
    status, boxed = api(server, "/search", {"image": query.read_bytes(), "box": ",".join(map(str, drawn))})
    assert status == 200 and boxed["box"] == drawn
    assert "box " + ", ".join(map(str, drawn)) in driver.find_element(By.ID, "status").text
    assert [(i, s) for i, s, _ in shown_results(driver)] == [
        (h["id"], f"{h['score']:.4f}") for h in boxed["results"]
    ]

    # Typed values move the drawn box, and Search uses them.
    x1 = driver.find_element(By.ID, "box-x1")
    x1.clear()
    x1.send_keys("90")
    assert rect_shown.size["width"] == pytest.approx((90 - drawn[0]) * scale, abs=3)
    driver.find_element(By.ID, "search").click()
    wait_idle(driver, "searching with a typed box")
    typed = [drawn[0], drawn[1], 90, drawn[3]]
    assert "box " + ", ".join(map(str, typed)) in driver.find_element(By.ID, "status").text
    screenshot(driver, tmp_path, "upload-box-results.png")

    # Clear the box: the whole image is searched again.
    driver.find_element(By.ID, "clear-box").click()
    assert box_fields(driver) == ["", "", "", ""] and not rect_shown.is_displayed()
    wait_idle(driver, "clearing the box")
    assert [i for i, _, _ in shown_results(driver)] == [h["id"] for h in answer["results"]]

    # Click a result: it becomes the query (the indexed image, by id) and is searched with.
    clicked_id, _, clicked_name = shown_results(driver)[1]
    driver.find_elements(By.CSS_SELECTOR, "#results .result")[1].click()
    WebDriverWait(driver, WAIT_S).until(lambda b: f"/image?id={clicked_id}" in img.get_attribute("src"))
    wait_idle(driver, "clicking a result")
    assert box_fields(driver) == ["", "", "", ""]
    status, by_id = api(server, "/search", {"id": str(clicked_id)})
    assert status == 200
    shown = shown_results(driver)
    assert [(i, s) for i, s, _ in shown] == [(h["id"], f"{h['score']:.4f}") for h in by_id["results"]]
    assert shown[0][:1] == (clicked_id,) and shown[0][2] == clicked_name
    first = driver.find_elements(By.CSS_SELECTOR, "#results .result")[0]
    assert "current" in first.get_attribute("class")
    assert clicked_name in driver.find_element(By.ID, "query-caption").text

    # The query's token attention maps, one click away: one map per token.
    button = driver.find_element(By.ID, "attention-btn")
    assert health.get("attention") is True, "the server does not report token attention for a Token model"
    assert button.is_displayed()
    button.click()
    num_tokens = server.service.model.tr.num_tokens
    WebDriverWait(driver, WAIT_S).until(
        lambda b: len(b.find_elements(By.CSS_SELECTOR, "#attention .map img")) == num_tokens
    )
    wait_idle(driver, "asking for attention maps")
    maps = driver.find_elements(By.CSS_SELECTOR, "#attention .map img")
    assert all(m.get_attribute("src").startswith("data:image/jpeg;base64,") for m in maps)
    assert all(driver.execute_script("return arguments[0].naturalWidth", m) > 0 for m in maps)
    assert driver.find_element(By.ID, "error").is_displayed() is False
    screenshot(driver, tmp_path, "clicked-result-attention.png")


def test_drop_a_file_and_see_the_server_refuse(server, driver, tmp_path, monkeypatch):
    photos = server.service.index.path.parent / "photos"
    driver.get(server.url)
    WebDriverWait(driver, WAIT_S).until(lambda b: "images" in b.find_element(By.ID, "health").text)

    # A file dropped on the page (a DataTransfer holding a File, as the browser builds for a real drop).
    dropped = (photos / "img4.png").read_bytes()
    driver.execute_script(
        """
        const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], "dropped.png", {type: "image/png"}));
        const target = document.getElementById("drop");
        for (const type of ["dragenter", "dragover", "drop"]) {
          target.dispatchEvent(new DragEvent(type, {dataTransfer: dt, bubbles: true, cancelable: true}));
        }
        """,
        base64.b64encode(dropped).decode(),
    )
    wait_idle(driver, "dropping a file")
    assert "dropped.png" in driver.find_element(By.ID, "query-caption").text
    assert shown_results(driver)[0][2] == "img4.png"
    assert "dragging" not in driver.find_element(By.TAG_NAME, "body").get_attribute("class")

    # A refusal: a text file is not an image; the page shows the server's own message.
    text = tmp_path / "notes.txt"
    text.write_bytes(b"hello, not an image")
    status, refused = api(server, "/search", {"image": text.read_bytes()})
    assert status == 400 and refused["error"]
    driver.find_element(By.ID, "file").send_keys(str(text))
    error = driver.find_element(By.ID, "error")
    WebDriverWait(driver, WAIT_S).until(lambda b: error.is_displayed())
    wait_idle(driver, "uploading a text file")
    assert error.text == refused["error"]
    assert "stale" in driver.find_element(By.ID, "results").get_attribute("class")  # the previous query's
    assert driver.find_element(By.ID, "preview-note").is_displayed()  # the browser cannot show it either
    screenshot(driver, tmp_path, "refused-upload.png")

    # A bad typed box is caught before asking the server; a good file afterwards clears the message.
    driver.find_element(By.ID, "file").send_keys(str(photos / "img1.png"))
    wait_idle(driver, "choosing a good file again")
    assert not error.is_displayed() and shown_results(driver)[0][2] == "img1.png"
    for name, value in zip(("x0", "y0", "x1", "y1"), ("50", "10", "20", "40"), strict=True):
        driver.find_element(By.ID, f"box-{name}").send_keys(value)
    driver.find_element(By.ID, "search").click()
    assert error.is_displayed() and "x0 < x1" in error.text

    # An overloaded server (its search queue full: 503): the page says so, and the next try works.
    driver.find_element(By.ID, "clear-box").click()  # searches the whole image again
    wait_idle(driver, "clearing the box")

    def full(query):
        raise Overloaded("queue full")

    monkeypatch.setattr(server.service.batcher, "submit", full)
    driver.find_element(By.ID, "search").click()
    WebDriverWait(driver, WAIT_S).until(lambda b: error.is_displayed())
    wait_idle(driver, "searching an overloaded server")
    assert "busy" in error.text and "try again" in error.text
    monkeypatch.undo()
    driver.find_element(By.ID, "search").click()
    wait_idle(driver, "searching again")
    assert not error.is_displayed() and shown_results(driver)[0][2] == "img1.png"
