"""The production lifecycle on the smoke profile, in a copy of the reproduced smoke project: new interaction files
through the front door (accepted as a new DVC data version, or rejected whole with the rule named); monitoring of
the data version (the DVC stage) and of the deployed model with the real service's request log (the command); and
the whole loop with the real service behind nginx: serve, new data, monitor, retrain, gate, switch under load."""
import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest
import yaml
from bento_server import free_port, package, serving
from conftest import project_env, run

from reelrank.core import md5_file
from reelrank.request_log import pseudonym, read_request_log

DAY = 86_400


@pytest.fixture(scope="module")
def project(smoke_project, tmp_path_factory):
    "A copy of the reproduced smoke project that these tests may change (the session's copy stays as it is)."
    copy = tmp_path_factory.mktemp("lifecycle") / "project"
    shutil.copytree(smoke_project, copy, symlinks=True)
    return copy


def data_version(project) -> dict[str, str]:
    "md5 of every file of the data stages' outputs and of the accepted increments."
    return {str(p.relative_to(project)): md5_file(p) for d in ("data/raw", "data/interim", "data/accepted")
            for p in sorted((project / d).rglob("*")) if p.is_file()}


def next_month(project, users: int = 8, per_user: int = 3) -> pd.DataFrame:
    "Real users of the project rating catalog movies they have not rated, in the month after the data ends."
    interactions = pd.read_parquet(project / "data" / "interim" / "interactions.parquet")
    items = pd.read_parquet(project / "data" / "raw" / "items.parquet").item_id.to_numpy()
    start = int(interactions.timestamp.max()) + DAY
    rows = []
    for number, (user, seen) in enumerate(interactions.groupby("user_id").item_id):
        if number == users:
            break
        unseen = [item for item in items if item not in set(seen)][:per_user]
        rows += [(user, item, 4.0, start + (number * per_user + k) * 3600) for k, item in enumerate(unseen)]
    return pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])


def test_bad_files_are_rejected_whole_with_the_rule_named_and_the_data_version_intact(project):
    before = data_version(project)
    interactions = pd.read_parquet(project / "data" / "interim" / "interactions.parquet")
    good = next_month(project)
    incoming = project / "data" / "incoming"
    incoming.mkdir()
    bad = {"doubled.csv": pd.concat([good, good.iloc[:2]]),
           "resent.csv": pd.concat([good.iloc[:3], interactions.iloc[:2]]),
           "future.csv": good.assign(timestamp=2_208_988_800),   # 2040-01-01, past timestamp_window
           "unknown.csv": good.assign(item_id=good.item_id.max() + 10**9),
           "renamed.csv": good.rename(columns={"user_id": "uid"})}
    for name, frame in bad.items():
        frame.to_csv(incoming / name, index=False)
    sent = {name: (incoming / name).read_bytes() for name in bad}
    proc = run(["python", "-m", "reelrank.incoming"], project, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "5 of 5 file(s) rejected" in proc.stderr
    for name, rule in [("doubled.csv", "duplicates"), ("resent.csv", "duplicates"), ("future.csv", "timestamp_window"),
                       ("unknown.csv", "unknown_items"), ("renamed.csv", "schema")]:
        assert f"rejected {name} (rule {rule})" in proc.stdout
    kept = {p.name.split("-", 1)[1]: p.read_bytes() for p in (project / "data" / "rejected").iterdir()
            if not p.name.endswith(".json")}
    assert kept == sent
    assert "repeat a (user_id, item_id, timestamp) already in the data version" in proc.stderr + "".join(
        p.read_text() for p in (project / "data" / "rejected").glob("*resent.csv.json"))
    assert data_version(project) == before
    assert "Data and pipelines are up to date" in run(["dvc", "status"], project).stdout


def test_a_good_file_is_a_new_data_version_and_the_pipeline_reruns_from_validate(project):
    good = next_month(project)
    interactions_before = len(pd.read_parquet(project / "data" / "interim" / "interactions.parquet"))
    raw_before = {p.name: md5_file(p) for p in (project / "data" / "raw").iterdir()}
    (project / "data" / "incoming").mkdir(exist_ok=True)
    good.to_parquet(project / "data" / "incoming" / "2016-11.parquet", index=False)
    proc = run(["python", "-m", "reelrank.incoming"], project)
    assert f"accepted 2016-11.parquet: {len(good)} interactions -> data/accepted/2016-11.parquet" in proc.stdout
    assert (project / "data" / "accepted" / "2016-11.parquet.dvc").exists()
    assert not any((project / "data" / "incoming").iterdir())
    status = run(["dvc", "status", "validate"], project).stdout
    assert "changed deps" in status and "data/accepted" in status
    repro = run(["dvc", "repro", "split"], project)
    output = repro.stdout + repro.stderr
    assert "Stage 'ingest' didn't change, skipping" in output
    assert "Running stage 'validate'" in output and "Running stage 'split'" in output
    assert {p.name: md5_file(p) for p in (project / "data" / "raw").iterdir()} == raw_before
    after = pd.read_parquet(project / "data" / "interim" / "interactions.parquet")
    assert len(after) == interactions_before + len(good)
    assert after.merge(good, on=["user_id", "item_id", "timestamp"]).shape[0] == len(good)
    # the data version is in git: back at the previous commit, DVC restores the version without the increment
    for command in (["git", "add", "data/accepted", "dvc.lock"],
                    ["git", "-c", "user.email=ci@reelrank.dev", "-c", "user.name=ci", "commit", "-qm", "2016-11"]):
        run(command, project)
    shutil.rmtree(project / "data" / "accepted")
    run(["git", "checkout", "-q", "HEAD~1", "--", "data/accepted"], project)
    assert sorted(p.name for p in (project / "data" / "accepted").iterdir()) == ["README.md"]
    shutil.rmtree(project / "data" / "accepted")
    run(["git", "checkout", "-q", "HEAD", "--", "data/accepted"], project)
    run(["dvc", "checkout", "data/accepted/2016-11.parquet.dvc"], project)
    assert len(pd.read_parquet(project / "data" / "accepted" / "2016-11.parquet")) == len(good)


def accept(project, frame: pd.DataFrame, name: str) -> None:
    "Drop `frame` into the project's drop box as `name`, accept it and bring data/interim up to date."
    (project / "data" / "incoming").mkdir(exist_ok=True)
    frame.to_parquet(project / "data" / "incoming" / name, index=False)
    run(["python", "-m", "reelrank.incoming"], project)
    run(["dvc", "repro", "validate"], project)


def new_faces(project, users: int = 12, per_user: int = 4) -> pd.DataFrame:
    "Users nobody has seen, all rating the catalog's least rated movies, in the month after the data ends."
    interactions = pd.read_parquet(project / "data" / "interim" / "interactions.parquet")
    rare = interactions.item_id.value_counts(ascending=True).index[:per_user].tolist()
    start = int(interactions.timestamp.max()) + DAY
    first = int(interactions.user_id.max()) + 1
    return pd.DataFrame([(first + user, item, 3.5, start + (user * per_user + k) * 3600)
                         for user in range(users) for k, item in enumerate(rare)],
                        columns=["user_id", "item_id", "rating", "timestamp"])


def test_monitor_stage_records_the_drift_of_the_data_versions_latest_period(project):
    "Accepting an increment reruns the monitor stage, whose metrics file then covers the new data version's end."
    days = yaml.safe_load((project / "params.yaml").read_text())["monitor"]["period_days"]
    drift = project / "reports" / "monitor" / "drift.json"

    def in_latest_period() -> int:
        interactions = pd.read_parquet(project / "data" / "interim" / "interactions.parquet")
        return int((interactions.timestamp >= interactions.timestamp.max() + 1 - days * DAY).sum())

    run(["dvc", "repro", "monitor"], project)
    before = json.loads(drift.read_text())
    assert before["drift"]["interactions"] == in_latest_period()
    accept(project, next_month(project), "monitored.parquet")
    repro = run(["dvc", "repro", "monitor"], project)
    assert "Running stage 'monitor'" in repro.stdout
    report = json.loads(drift.read_text())
    assert set(report) == {"period", "drift", "alerts"}
    assert report["drift"]["interactions"] == in_latest_period()
    assert report["period"]["end"] > before["period"]["end"]
    shown = run(["dvc", "metrics", "show", "--json"], project).stdout
    assert "reports/monitor/drift.json" in shown and "popularity_shift" in shown
    assert "Stage 'monitor' didn't change, skipping" in run(["dvc", "repro", "monitor"], project).stdout


def test_monitor_command_flags_drift_and_decay_of_the_deployed_model_and_serving_health(project, tmp_path):
    "The deployed model is served with its request log on, then new users arrive: the monitor exits 1 naming them."
    production = project / "models" / "production"
    shutil.copytree(project / "models" / "selected", production)
    serve = yaml.safe_load((project / "params.yaml").read_text())["serve"]
    env = {**project_env(), "BENTOML_HOME": str(tmp_path / "bentoml"), "REELRANK_AUTH": "off",
           "REELRANK_REQUEST_LOG_DIR": str(tmp_path / "requests"), "REELRANK_LOG_KEY": "k" * 40}
    summary = package(production, serve, tmp_path, env)
    trained = pd.read_parquet(production / "interactions.parquet")
    users, movie = trained.user_id.unique()[:2].tolist(), int(trained.item_id.iloc[0])
    with serving(summary["bento"], tmp_path, env) as (url, _), httpx.Client(base_url=url, timeout=30) as http:
        for body in [{"user_id": users[0]}, {"user_id": users[1], "history": [movie, 10**12]}, {"user_id": 10**9},
                     {"history": []}]:
            assert http.post("/recommend", json=body).status_code == 200
    accept(project, new_faces(project), "new-faces.parquet")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["monitor"]["thresholds"] = {**dict.fromkeys(params["monitor"]["thresholds"]), "new_user_share": 0.5,
                                       "requests": 1}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = run(["python", "-m", "reelrank.monitor", "--params", str(tmp_path / "params.yaml"),
                "--request-log", str(tmp_path / "requests")], project, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    report = json.loads((project / "reports" / "monitor" / "production.json").read_text())
    interactions = pd.read_parquet(project / "data" / "interim" / "interactions.parquet")
    period = interactions[interactions.timestamp > trained.timestamp.max()]
    new_share = (~pd.Series(period.user_id.unique()).isin(trained.user_id)).mean()
    assert new_share >= 12 / 20 and report["drift"]["new_user_share"] == pytest.approx(new_share)
    assert report["decay"]["users"] >= 12 and report["decay"]["cold_share"] == pytest.approx(new_share)
    assert report["serving"]["requests"] == 4 and report["serving"]["fallback_share"] == 0.5
    assert report["serving"]["unknown_item_share"] == 0.5
    assert report["serving"]["model_versions"] == [summary["model"].split(":")[1]]
    assert report["alerts"] == [f"new_user_share {new_share:.4g} above the maximum 0.5"]
    assert "1 monitoring threshold(s) crossed" in proc.stderr and "ALERT new_user_share" in proc.stdout
    params["monitor"]["thresholds"]["new_user_share"] = None
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert run(["python", "-m", "reelrank.monitor", "--params", str(tmp_path / "params.yaml")], project).returncode == 0


def command(args: list[str], cwd, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    "Run a command with `env` (the service's environment); on failure show its output."
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def test_served_then_new_data_monitored_retrained_gated_and_switched_with_no_failed_request(project, tmp_path):
    """The lifecycle end to end with the real service: the first model is served through nginx with its request
    log on; a new period arrives through the front door; the monitor flags its new users; the pipeline retrains;
    the gate decides and records why; the promoted bento replaces the running one under load without a failed
    request, and the answers' model version changes."""
    key = "0123456789abcdef" * 3
    env = {**project_env(), "BENTOML_HOME": str(tmp_path / "bentoml"), "REELRANK_AUTH": "off",
           "REELRANK_REQUEST_LOG_DIR": str(tmp_path / "requests"), "REELRANK_LOG_KEY": key}
    run_dir, port = tmp_path / "deployment", free_port()
    shutil.rmtree(project / "models" / "production", ignore_errors=True)
    first = command(["reelrank", "promote"], project, env)
    assert "promoted: no production model yet" in first.stdout
    command(["reelrank", "deploy", "start", "--port", str(port), "--run-dir", str(run_dir)], project, env)
    state = json.loads((run_dir / "deployment.json").read_text())
    url = f"http://127.0.0.1:{port}"
    try:
        users = pd.read_parquet(project / "models" / "production" / "interactions.parquet").user_id.unique()[:5]
        with httpx.Client(base_url=url, timeout=30) as http:
            answers = [http.post("/recommend", json={"user_id": int(user)}).json() for user in users]
        versions = {answer["model"]["version"] for answer in answers}
        assert len(versions) == 1
        logged = read_request_log(tmp_path / "requests")
        assert set(logged.user) == {pseudonym(key.encode(), int(user)) for user in users}
        assert not any(str(int(user)) == value for user in users for value in logged.user)

        accept(project, pd.concat([next_month(project), new_faces(project)]), "later.parquet")
        run(["dvc", "repro"], project)
        params = yaml.safe_load((project / "params.yaml").read_text())
        params["monitor"]["thresholds"] = {**dict.fromkeys(params["monitor"]["thresholds"]), "new_user_share": 0.3}
        params["gate"]["margin"] = 1.0   # any candidate passes: this test is about the switch, 15_promotion about the rule
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        monitored = command(["reelrank", "monitor", "--params", str(tmp_path / "params.yaml")], project, env,
                            check=False)
        assert monitored.returncode == 1 and "ALERT new_user_share" in monitored.stdout

        outcomes, stop = [], threading.Event()

        def load() -> None:
            "Requests one after another on new connections, as many clients would send them, until told to stop."
            with httpx.Client(base_url=url, timeout=30, limits=httpx.Limits(max_keepalive_connections=0)) as client:
                while not stop.is_set():
                    try:
                        answer = client.post("/recommend", json={"user_id": int(users[0])})
                        outcomes.append((answer.status_code, answer.json()["model"]["version"]
                                         if answer.status_code == 200 else answer.text))
                    except httpx.HTTPError as exc:
                        outcomes.append((None, repr(exc)))

        worker = threading.Thread(target=load)
        worker.start()
        try:
            promoted = command(["reelrank", "promote", "--switch", "--params", str(tmp_path / "params.yaml"),
                                "--run-dir", str(run_dir)], project, env)
            time.sleep(2)
        finally:
            stop.set()
            worker.join()
        assert "promoted: the candidate is not significantly worse" in promoted.stdout and "now serving" in promoted.stdout
        failed = [outcome for outcome in outcomes if outcome[0] != 200]
        served = [version for _, version in outcomes]
        print(f"{len(outcomes)} requests during the switch, {len(failed)} failed")
        assert len(outcomes) > 20 and failed == []
        assert served[0] in versions and served[-1] not in versions
        assert not _process_alive(state["backend"]["pid"])
        decision = json.loads(max((project / "reports" / "lifecycle" / "decisions").glob("*.json")).read_text())
        assert decision["promote"] and 0 <= decision["p_value"] <= 1 and decision["users"] > 0
        assert len(decision["provenance"]["git_commit"]) == 40 and decision["provenance"]["data_md5"]
        assert (project / "models" / "production" / "decision.md").read_text().startswith("# Promotion decision")
    finally:
        command(["reelrank", "deploy", "stop", "--run-dir", str(run_dir)], project, env, check=False)
    current = json.loads((run_dir / "deployment.json").read_text()) if (run_dir / "deployment.json").exists() else state
    assert not _process_alive(current["nginx_pid"])


def _process_alive(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "zombie" not in status.read_text().lower()
