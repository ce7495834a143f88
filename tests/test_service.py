"""The BentoML service over real HTTP. A small EASE^R model, saved with the layout of models/selected, is packaged by
`python -m reelrank.package` into a temporary BENTOML_HOME; the bento is served with `bentoml serve` on a free
loopback port (bearer-token auth and request logging switched on through their environment variables) and stopped
by killing its process group. Good and bad requests check the contract in the default `inline` scoring mode; a
second bento with `scoring: batched` (a Scorer service with adaptive batching) must answer the same. Parity with
the offline evaluation is tests/test_parity.py."""
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import yaml
from bento_server import package, serving
from conftest import ROOT, VENV_BIN, project_env

from reelrank.core import write_json, write_parquet
from reelrank.models.base import save_model
from reelrank.models.ease import EASE
from reelrank.split import Catalog, Interactions

TOKEN = "test-token-1234"
MAX_BODY = 65536  # small enough to test 413 cheaply, large enough for a full batch of small requests
UNKNOWN_USER, UNKNOWN_MOVIE = 999_999, 7


def save_small_model(directory: Path) -> pd.DataFrame:
    "EASE^R on 60 synthetic users x 80 movies, saved like models/selected (model, interactions, card)."
    rng = np.random.default_rng(0)
    items = pd.DataFrame({"item_id": np.arange(1, 81) * 10, "title": [f"Movie {i}" for i in range(1, 81)],
                          "genres": "Drama", "year": 2000})
    catalog = Catalog.from_frame(items)
    rows = [(user, int(item), t) for user in range(1, 61)
            for t, item in enumerate(rng.choice(items.item_id, size=rng.integers(3, 20), replace=False))]
    interactions = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    model = EASE(catalog, {"l2": 10.0}).fit(Interactions.from_frame(interactions, catalog))
    save_model(model, directory)
    write_parquet(interactions, directory / "interactions.parquet")
    write_json(directory / "card.json", {
        "model": "ease", "family": "ease", "params": {"l2": 10.0}, "fitted_on": "synthetic", "metric": "ndcg@10",
        "data": {"interactions": len(interactions), "users": 60, "items": 80},
        "val": {"ndcg@10": 0.2}, "test": {"ndcg@10": 0.1},
        "provenance": {"git_commit": "a" * 40, "data_md5": "0123456789abcdef.dir", "params_hash": "feedbeef"}})
    return interactions


def serve_config(**changes) -> dict:
    return {**yaml.safe_load((ROOT / "conf" / "serve" / "default.yaml").read_text()), "max_body_bytes": MAX_BODY,
            **changes}


@pytest.fixture(scope="module")
def packaged(tmp_path_factory):
    "The small model, packaged into a temporary BentoML home; yields (workdir, env, bento.json)."
    work = tmp_path_factory.mktemp("service")
    save_small_model(work / "selected")
    env = {**project_env(), "BENTOML_HOME": str(work / "bentoml")}
    return work, env, package(work / "selected", serve_config(), work, env)


@pytest.fixture(scope="module")
def server(packaged):
    "`bentoml serve <bento>` (default settings: inline scoring) with auth and request logging on; yields the URL."
    work, env, summary = packaged
    env = {**env, "REELRANK_API_TOKEN": TOKEN, "REELRANK_REQUEST_LOG_DIR": str(work / "requests")}
    with serving(summary["bento"], work, env) as (url, _):
        yield url


@pytest.fixture(scope="module")
def batched_server(tmp_path_factory):
    "The same model packaged with `scoring: batched` (a Scorer service behind the API), served; yields the URL."
    work = tmp_path_factory.mktemp("service-batched")
    save_small_model(work / "selected")
    env = {**project_env(), "BENTOML_HOME": str(work / "bentoml"), "REELRANK_API_TOKEN": TOKEN}
    summary = package(work / "selected", serve_config(scoring="batched"), work, env)
    with serving(summary["bento"], work, env) as (url, _):
        yield url


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as http:
        yield http


def test_package_stage_outputs(packaged):
    work, env, summary = packaged
    assert summary["bento"].startswith("reelrank:") and summary["model"].startswith("reelrank-recommender:")
    assert summary["labels"] | {"model": "ease"} == summary["labels"]
    assert {k: summary["labels"][k] for k in ("git_commit", "data_md5", "params_hash")} == {
        "git_commit": "a" * 40, "data_md5": "0123456789abcdef.dir", "params_hash": "feedbeef"}
    assert summary["archive"] == "reelrank.tar" and (work / "bento" / "reelrank.tar").stat().st_size > 0
    name, version = summary["model"].split(":")
    stored = Path(env["BENTOML_HOME"]) / "models" / name / version
    assert sorted(p.name for p in stored.iterdir() if p.name != "model.yaml") == [
        "card.json", "ease.safetensors", "interactions.parquet", "items.parquet", "model.json"]
    info = yaml.safe_load((stored / "model.yaml").read_text())
    assert info["labels"]["git_commit"] == "a" * 40 and info["metadata"]["serve"]["max_body_bytes"] == MAX_BODY
    assert info["metadata"]["card"]["test"] == {"ndcg@10": 0.1}


def test_bento_lists_every_package_its_code_imports():
    "A containerised bento installs only bentofile's packages: each top-level import of its files must be one of them."
    import ast
    from importlib.metadata import packages_distributions

    bentofile = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    listed = {spec.split("==")[0].lower().replace("_", "-") for spec in bentofile["python"]["packages"]}
    distributions = packages_distributions()
    excluded = {path for pattern in bentofile.get("exclude", []) for path in (ROOT / "src").glob(pattern)}
    missing = set()
    for pattern in bentofile["include"]:
        for path in sorted(set((ROOT / "src").glob(pattern)) - excluded):
            for node in ast.parse(path.read_text()).body:  # module level: what importing the file needs
                names = ([alias.name for alias in node.names] if isinstance(node, ast.Import) else
                         [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
                for name in names:
                    top = name.split(".")[0]
                    if top in sys.stdlib_module_names or top in ("reelrank", "__future__"):
                        continue
                    provided = {d.lower().replace("_", "-") for d in distributions.get(top, [top])}
                    if not provided & listed:
                        missing.add(f"{path.relative_to(ROOT)} imports {top}")
    assert not missing, f"add to bentofile.yaml python.packages: {sorted(missing)}"
    locked = {line.split("==")[0].lower(): line for line in (ROOT / "requirements.lock").read_text().splitlines()}
    drifted = [spec for spec in bentofile["python"]["packages"] if locked.get(spec.split("==")[0].lower()) != spec]
    assert not drifted, f"bentofile.yaml pins that differ from requirements.lock: {drifted}"


def test_exported_archive_restores_the_bento_elsewhere(packaged, tmp_path):
    "models/bento/ is what DVC tracks: importing its archive into an empty store gives the same bento and model."
    work, env, summary = packaged
    elsewhere = {**env, "BENTOML_HOME": str(tmp_path / "bentoml")}
    bentoml_cli = str(Path(VENV_BIN) / "bentoml")
    subprocess.run([bentoml_cli, "import", str(work / "bento" / summary["archive"])], env=elsewhere, check=True,
                   capture_output=True, timeout=120)
    for command in (["get", summary["bento"]], ["models", "get", summary["model"]]):
        found = subprocess.run([bentoml_cli, *command], env=elsewhere, capture_output=True, timeout=60, check=False)
        assert found.returncode == 0, found.stderr


def test_probes_are_open_without_a_token(server):
    for path in ("/livez", "/readyz", "/metrics"):
        assert httpx.get(server + path).status_code == 200


def test_recommend_known_user(client):
    body = client.post("/recommend", json={"user_id": 1, "k": 5}).json()
    assert len(body["items"]) == 5 and body["fallback"] is None and body["ignored_history"] == []
    assert set(body["items"][0]) == {"movie_id", "title", "score"} and body["items"][0]["title"].startswith("Movie ")
    assert body["model"]["name"] == "ease" and body["model"]["version"]
    scores = [item["score"] for item in body["items"]]
    assert scores == sorted(scores, reverse=True)


def test_unknown_user_gets_flagged_popularity(client):
    body = client.post("/recommend", json={"user_id": UNKNOWN_USER}).json()
    assert body["fallback"] == "popularity" and len(body["items"]) == 10
    assert client.post("/recommend", json={"history": []}).json()["items"] == body["items"]


def test_unknown_history_movies_are_ignored_and_listed(client):
    body = client.post("/recommend", json={"history": [10, UNKNOWN_MOVIE, 20], "k": 3}).json()
    assert body["ignored_history"] == [UNKNOWN_MOVIE] and body["fallback"] is None
    assert not {10, 20} & {item["movie_id"] for item in body["items"]}
    only_unknown = client.post("/recommend", json={"history": [UNKNOWN_MOVIE]}).json()
    assert only_unknown["fallback"] == "popularity" and only_unknown["ignored_history"] == [UNKNOWN_MOVIE]


def test_similar(client):
    body = client.post("/similar", json={"movie_id": 10, "k": 4}).json()
    assert body["movie_id"] == 10 and len(body["items"]) == 4 and 10 not in [i["movie_id"] for i in body["items"]]
    missing = client.post("/similar", json={"movie_id": UNKNOWN_MOVIE})
    assert missing.status_code == 404 and f"movie {UNKNOWN_MOVIE} is not in the catalog" in missing.text


def test_recommend_batch_answers_in_order(client):
    requests = [{"user_id": 1, "k": 2}, {"user_id": UNKNOWN_USER, "k": 3}, {"history": [10], "exclude_seen": False}]
    answers = client.post("/recommend_batch", json={"requests": requests}).json()
    assert [len(a["items"]) for a in answers] == [2, 3, 10]
    assert answers[0] == client.post("/recommend", json=requests[0]).json()
    assert answers[1]["fallback"] == "popularity"


MISTAKES = [  # (path, request keyword arguments, status, a fragment of the message)
    ("/recommend", {"content": b'{"user_id": 1,'}, 400, "Invalid JSON"),
    ("/recommend", {"content": b""}, 400, "give a user_id, a history"),
    ("/recommend", {"json": {"user_id": "one"}}, 400, "user_id"),
    ("/recommend", {"json": {"user_id": 1, "k": 0}}, 400, "greater than or equal to 1"),
    ("/recommend", {"json": {"user_id": 1, "k": 101}}, 400, "less than or equal to 100"),
    ("/recommend", {"json": {"user_id": 1, "k": 2.5}}, 400, "k"),
    ("/recommend", {"json": {"user_id": 1, "exclude_seen": "no"}}, 400, "exclude_seen"),
    ("/recommend", {"json": {"history": list(range(501))}}, 400, "at most 500"),
    ("/recommend", {"json": {"history": [1, "2"]}}, 400, "history"),
    ("/recommend", {"json": {"usr_id": 1}}, 400, "Extra inputs are not permitted"),
    ("/recommend", {"json": [1, 2]}, 400, "validation error"),
    ("/recommend", {"data": {"user_id": "1"}}, 415, "application/json"),
    ("/recommend", {"content": b'{"history": [' + b"1," * 40000 + b"1]}"}, 413, f"{MAX_BODY} bytes"),
    ("/recommend", {"content": iter([b'{"history": [', b"1," * 40000, b"1]}"])}, 413, f"{MAX_BODY} bytes"),
    ("/similar", {"json": {"movie_id": -1}}, 400, "greater than or equal to 0"),
    ("/similar", {"json": {}}, 400, "movie_id"),
    ("/recommend_batch", {"json": {"requests": []}}, 400, "at least 1"),
    ("/recommend_batch", {"json": {"requests": [{"user_id": 1}] * 1001}}, 400, "at most 1000"),
    ("/recommend_batch", {"json": {"requests": [{"user_id": 1}, {"user_id": 2, "k": 500}]}}, 400, "requests"),
]


@pytest.mark.parametrize("path,kwargs,status,fragment", MISTAKES, ids=[f"{m[0]}-{i}" for i, m in enumerate(MISTAKES)])
def test_client_mistakes_are_4xx_with_a_message(client, path, kwargs, status, fragment):
    response = client.post(path, **kwargs)
    assert response.status_code == status, response.text
    assert fragment in response.text


def test_wrong_method_and_missing_token(server, client):
    assert client.get("/recommend").status_code == 405
    no_token = httpx.post(f"{server}/recommend", json={"user_id": 1})
    assert no_token.status_code == 401 and "bearer token" in no_token.json()["error"]
    assert no_token.headers["www-authenticate"] == "Bearer"
    wrong = httpx.post(f"{server}/recommend", json={"user_id": 1}, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401


def server_errors(url: str) -> list[str]:
    "The service's metric lines that count a 5xx answer."
    return [line for line in httpx.get(f"{url}/metrics").text.splitlines()
            if line.startswith("bentoml_") and 'http_response_code="5' in line and not line.endswith(" 0.0")]


def metric_total(url: str, name: str) -> float:
    lines = httpx.get(f"{url}/metrics").text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name))


def concurrent_answers(url: str, users: list[int], rounds: int) -> dict[int, list]:
    "Each user's items from `rounds` rounds of concurrent /recommend calls, checked equal to a lone call's."
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30,
                      limits=httpx.Limits(max_connections=len(users))) as client, ThreadPoolExecutor(len(users)) as pool:
        expected = {u: client.post("/recommend", json={"user_id": u}).json()["items"] for u in users}
        for _ in range(rounds):
            answers = list(pool.map(lambda u: client.post("/recommend", json={"user_id": u}), users))
            assert [a.status_code for a in answers] == [200] * len(users)
            assert all(a.json()["items"] == expected[u] for u, a in zip(users, answers))
    return expected


def test_concurrent_calls_are_answered_alike(server):
    concurrent_answers(server, list(range(1, 33)), rounds=3)


def test_batched_scoring_forms_batches_and_answers_like_inline(server, batched_server):
    users = list(range(1, 33))
    singles_before = metric_total(batched_server, 'bentoml_service_adaptive_batch_size_bucket{le="1.0"')
    batches_before = metric_total(batched_server, "bentoml_service_adaptive_batch_size_count")
    # 160 concurrent calls: more than BentoML's default connection recycling period (100)
    batched = concurrent_answers(batched_server, users, rounds=5)
    batches = metric_total(batched_server, "bentoml_service_adaptive_batch_size_count") - batches_before
    singles = metric_total(batched_server, 'bentoml_service_adaptive_batch_size_bucket{le="1.0"') - singles_before
    assert batches > singles, "no batch of more than one request was formed"
    assert batched == concurrent_answers(server, users, rounds=0)
    with httpx.Client(base_url=batched_server, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        assert client.post("/similar", json={"movie_id": UNKNOWN_MOVIE}).status_code == 404
        assert client.post("/recommend_batch", json={"requests": [{"user_id": 1}]}).json()[0]["items"] == batched[1]
        assert client.post("/recommend", json={"user_id": 1}, headers={"Authorization": "Bearer x"}).status_code == 401
    assert not server_errors(batched_server)


def test_requests_are_logged(packaged, client):
    work, _, _ = packaged
    client.post("/recommend", json={"user_id": 3, "k": 2})
    client.post("/similar", json={"movie_id": 10, "k": 3})
    records = [json.loads(line) for path in (work / "requests" / "reelrank_requests" / "data").glob("*.log")
               for line in path.read_text().splitlines()]
    asked = {"user_id": 3, "history": None, "k": 2, "exclude_seen": True}
    logged = [r for r in records if r["endpoint"] == "recommend" and json.loads(r["request"]) == asked]
    assert logged and len(logged[-1]["movie_ids"]) == 2 and "timestamp" in logged[-1]
    assert {r["endpoint"] for r in records} == {"recommend", "recommend_batch", "similar"}


def test_no_request_ended_in_a_server_error(server, client):
    "Runs last: every request above, good or bad, was answered without a 5xx."
    assert not server_errors(server)
