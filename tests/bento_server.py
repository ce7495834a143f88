"""Package a saved model into a bento and serve it for real, as tests and benchmarks both need: `python -m
reelrank.package` into a given BentoML home, then `bentoml serve` on a free loopback port, ready once /readyz
answers 200, stopped by killing its process group."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def package(model_dir: Path, serve: dict, work: Path, env: dict, root: Path = ROOT) -> dict:
    """Package `model_dir` with `serve` as the bento's arguments into work/bento, with the bentofile and src/ of
    `root` (another checkout of the project, for a benchmark's reference); returns its bento.json summary."""
    (work / "params.yaml").write_text(yaml.safe_dump({"serve": serve}))
    proc = subprocess.run([sys.executable, "-m", "reelrank.package", "--params", str(work / "params.yaml"),
                           "--model", str(model_dir), "--out", str(work / "bento")],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((work / "bento" / "bento.json").read_text())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_ready(url: str, alive: Callable[[], bool], log_tail: Callable[[], str], timeout: float,
                     poll: float = 0.5) -> None:
    "Poll `url`/readyz until it answers 200; fail with the server's log when it exits (`alive`) or times out."
    deadline = time.monotonic() + timeout
    while True:
        assert alive(), f"the server exited:\n{log_tail()}"
        assert time.monotonic() < deadline, f"not ready in {timeout} s:\n{log_tail()}"
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(poll)


@contextmanager
def serving(bento: str, work: Path, env: dict, timeout: float = 180) -> Iterator[tuple[str, subprocess.Popen]]:
    "`bentoml serve <bento>` on 127.0.0.1 (log: work/serve.log); yields (base URL, process) once ready."
    port, log_path = free_port(), work / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(BIN / "bentoml"), "serve", bento, "--host", "127.0.0.1", "--port", str(port)],
                                cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, lambda: proc.poll() is None, lambda: log_path.read_text()[-4000:], timeout)
        yield url, proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextmanager
def serving_for_load(model_dir: Path, serve: dict, work: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    "`model_dir` packaged with `serve` and served with authentication off and no request log, as load tests need."
    env = {**os.environ, "BENTOML_HOME": str(work / "bentoml"), "BENTOML_DO_NOT_TRACK": "true",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", serve["auth_switch_env"]: "off"}
    for name in (serve["auth_token_env"], serve["request_log_env"]):
        env.pop(name, None)
    with serving(package(model_dir, serve, work, env)["bento"], work, env, timeout=300) as served:
        yield served


# `status_mb(field)` for the benchmarks' child scripts (run with `python -c`): a field of /proc/self/status in MB,
# e.g. VmHWM, this process's own peak resident memory (unlike ru_maxrss, which survives exec)
STATUS_MB = """
def status_mb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) / 1024, 1)
"""


def write_figures(path: str | Path, figures: dict) -> None:
    "Write a benchmark's figures as JSON (under reports/benchmarks/) and say where."
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=1, default=str) + "\n")
    print(f"wrote {out}")


async def read_response(reader) -> tuple[int, bool]:
    "Read one HTTP/1.1 answer from an asyncio stream: its status, and whether the server asked to close."
    status = int((await reader.readline()).split()[1])
    length, close = 0, False
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        if name.lower() == "content-length":
            length = int(value)
        close |= name.lower() == "connection" and value.strip().lower() == "close"
    await reader.readexactly(length)
    return status, close
