"""The OCI image of a bento, built and run for real. The small EASE^R model tests/test_service.py serves is packaged
into a temporary BentoML home; scripts/image.sh turns the bento into an image (`bentoml containerize` with buildah;
a Debian stand-in for python:3.11-slim where no registry answers; the CPU torch wheel) and scripts/run-image.sh runs
it on a free loopback port, removed by its container ID afterwards. The image stays in podman's store as
reelrank-test:latest with the base image, so buildah's layer cache has them: only the first run on a machine builds
everything (minutes); later runs rebuild the bento's own files only. Skipped where buildah or podman is missing
(`make system-deps` installs them)."""
import os
import shutil
import subprocess
import time

import httpx
import pytest
from bento_server import free_port, package, wait_until_ready
from conftest import ROOT, project_env
from test_service import TOKEN, UNKNOWN_MOVIE, save_small_model, serve_config

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (shutil.which("buildah") and shutil.which("podman")),
                                 reason="needs buildah and podman: make system-deps")]

# The image with the CPU torch is about 2.1 GB; PyPI's CUDA torch would add more than 3 GB of NVIDIA libraries
MAX_IMAGE_BYTES = 3_000_000_000
TAG = "localhost/reelrank-test:latest"


def script(name: str, *args: str, env: dict, timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(ROOT / "scripts" / name), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def container_logs(container: str) -> str:
    logs = subprocess.run(["podman", "logs", container], capture_output=True, text=True, check=False)
    return (logs.stdout + logs.stderr)[-4000:]


def image_id(tag: str) -> str | None:
    found = subprocess.run(["podman", "image", "inspect", "--format", "{{.Id}}", tag], capture_output=True,
                           text=True, check=False)
    return found.stdout.strip() if found.returncode == 0 else None


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    "The small model's bento built into the image TAG; yields TAG."
    work = tmp_path_factory.mktemp("image")
    save_small_model(work / "selected")
    env = {**project_env(), "BENTOML_HOME": str(work / "bentoml")}
    bento = package(work / "selected", serve_config(), work, env)["bento"]
    previous = image_id(TAG)
    start = time.monotonic()
    built = script("image.sh", bento, TAG, env=env, timeout=1500)
    print(f"scripts/image.sh: {time.monotonic() - start:.0f} s\n{built.stdout[-300:]}")
    assert "(no CUDA)" in built.stdout
    if previous not in (None, image_id(TAG)):
        # the last run's image, untagged now: only its own top layers go, those it shares stay with the new one
        subprocess.run(["podman", "rmi", previous], capture_output=True, check=False)
    return TAG


@pytest.fixture(scope="module")
def url(image):
    "The image running on a free loopback port; yields its URL once /readyz answers, then removes the container."
    port, token_env = free_port(), serve_config()["auth_token_env"]
    # `-e NAME` passes the token from this environment, off the command line
    started = subprocess.run([str(ROOT / "scripts" / "run-image.sh"), "--detach", "-e", "BENTOML_HOST=127.0.0.1",
                              "-e", f"BENTOML_PORT={port}", "-e", token_env, image],
                             env={**os.environ, token_env: TOKEN}, capture_output=True, text=True, check=True)
    container = started.stdout.strip()
    url = f"http://127.0.0.1:{port}"
    def running() -> bool:
        return subprocess.run(["podman", "inspect", "--format", "{{.State.Running}}", container],
                              capture_output=True, text=True, check=False).stdout.strip() == "true"
    try:
        wait_until_ready(url, running, lambda: container_logs(container), timeout=300, poll=1)
        yield url
    finally:
        subprocess.run(["podman", "rm", "--force", container], capture_output=True, check=False)


def test_image_has_no_cuda_and_its_size(image):
    size = int(subprocess.run(["podman", "image", "inspect", "--format", "{{.Size}}", image], capture_output=True,
                              text=True, check=True).stdout)
    print(f"{image}: {size / 1e9:.2f} GB")
    assert size < MAX_IMAGE_BYTES


def test_running_image_answers(url):
    assert httpx.post(f"{url}/recommend", json={"user_id": 1}).status_code == 401
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as client:
        recommended = client.post("/recommend", json={"user_id": 1, "k": 5})
        print(recommended.text)
        assert recommended.status_code == 200
        body = recommended.json()
        assert body["model"]["name"] == "ease" and body["fallback"] is None and len(body["items"]) == 5
        first = body["items"][0]["movie_id"]

        similar = client.post("/similar", json={"movie_id": first, "k": 5})
        print(similar.text)
        assert similar.status_code == 200
        movies = [item["movie_id"] for item in similar.json()["items"]]
        assert len(movies) == 5 and first not in movies

        assert client.post("/similar", json={"movie_id": UNKNOWN_MOVIE}).status_code == 404
