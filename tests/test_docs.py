"""The documentation site: `make docs` builds it, a real HTTP server serves it, headless Chromium renders it."""
import html
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest
from conftest import ROOT, run, screenshot_pixels

from reelrank.report import find_chromium

SITE = ROOT / "_site"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def site_url():
    "Build the site with `make docs`, serve `_site/` on 127.0.0.1 and yield its base URL; stop the server after."
    started = time.perf_counter()
    run(["make", "docs"], ROOT, timeout=900)
    print(f"make docs: {time.perf_counter() - started:.0f} s")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                               "--directory", str(SITE)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"{url}/index.html", timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise AssertionError(f"the HTTP server (pid {server.pid}) did not answer on {url}")
        yield url
    finally:
        server.terminate()
        server.wait(timeout=10)


def chromium(url: str, *flags: str) -> str:
    "Run headless Chromium on `url` with `flags` in a throwaway profile; its standard output."
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run([find_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *flags, url],
                              capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, f"chromium failed on {url}: {proc.stderr[-2000:]}"
    return proc.stdout


def visible_text(dom: str) -> str:
    "The page's text: tags removed (syntax highlighting splits code into spans), entities decoded, spaces collapsed."
    return " ".join(html.unescape(re.sub(r"<[^>]+>", "", dom)).split())


def test_home_page_says_what_reelrank_is_and_links_every_notebook(site_url):
    dom = chromium(f"{site_url}/index.html", "--dump-dom")
    text = visible_text(dom)
    for fragment in ("notebook-first", "make run", "make test", "Reading order", "ingest ─> validate", "make docs"):
        assert fragment in text, fragment
    for page in ("core", "split", "metrics", "models_sasrec", "service", "cli", "protocol", "figures"):
        assert f'href="{page}.html"' in dom, page


def test_metrics_page_shows_signatures_examples_and_source_links(site_url):
    dom = chromium(f"{site_url}/metrics.html", "--dump-dom")
    text = visible_text(dom)
    # the signature show_doc rendered, with its parameters and its docstring
    for fragment in ("def evaluate_ranking( score_fn:ScoreFn, task:HoldOut, n_items:int, item_counts:np.ndarray,",
                     "k_save:int=100", "Rank the full catalog for every user of"):
        assert fragment in text, fragment
    assert 'id="evaluate_ranking"' in dom
    # an example, shown as code
    assert 'res = evaluate_ranking(fixed, task, 5, item_counts=np.array([5, 4, 3, 2, 1])' in text
    # the source link points into src/reelrank/ on the forge
    assert "https://github.com/reelrank/reelrank/blob/main/src/reelrank/metrics.py#L" in dom


def test_home_page_renders(site_url, tmp_path):
    png = tmp_path / "home.png"
    chromium(f"{site_url}/index.html", f"--screenshot={png}", "--window-size=1280,900")
    pixels, not_white, colors = screenshot_pixels(png)
    assert pixels.shape == (900, 1280, 3)
    assert not_white > 0.05 and colors > 20, "the home page rendered blank"
    # the theme's header bar (the stylesheet loaded): a band of one saturated colour across the top
    header = pixels[5:40, :, :]
    assert (header.max(axis=2) - header.min(axis=2) > 60).mean() > 0.9


def test_every_source_link_points_at_its_definition(site_url):
    "Each show_doc heading's source link names a line of src/ that defines that name (not a same-named one)."
    link = re.compile(r'href="https://github\.com/reelrank/reelrank/blob/main/src/(reelrank/[\w/]+\.py)#L(\d+)"'
                      r'[^>]*>source</a>.*?<h3 id="([^"]+)"', re.DOTALL)
    checked = 0
    for page in sorted(SITE.glob("*.html")):
        for module, line, anchor in link.findall(page.read_text()):
            name = anchor.rsplit(".", 1)[-1]
            code = (ROOT / "src" / module).read_text().splitlines()[int(line) - 1]
            assert re.match(rf"\s*(async def|def|class) {re.escape(name)}\b", code, re.IGNORECASE), (page.name, anchor, code)
            checked += 1
    assert checked > 100, checked
