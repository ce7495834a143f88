"""The production lifecycle on the smoke profile, in a copy of the reproduced smoke project: new interaction files
through the front door (accepted as a new DVC data version, or rejected whole with the rule named)."""
import shutil

import pandas as pd
import pytest
from conftest import run

from reelrank.core import md5_file

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
