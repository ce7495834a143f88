"""The DVC pipeline end to end on the smoke profile, in a temporary copy of the project: composition of conf/
into params.yaml, every stage's outputs, a no-op rerun, byte-identical data stages, the batch CLI, and failures
that leave earlier outputs intact."""
import json
import re
import time

import pandas as pd
import pytest
import yaml
from conftest import ROOT, run

from reelrank.core import compose_config, md5_file

MODELS = ["popularity", "ease", "ials", "two_tower", "sasrec", "blend"]


def test_committed_params_equal_composition_of_conf():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert params == compose_config(), "params.yaml is stale: run `make params` (or `dvc exp run`) and commit it"
    assert params["profile"] == "default"


def test_unknown_config_group_option_is_a_clear_error(tmp_path):
    out = tmp_path / "params.yaml"
    proc = run(["python", "-c", ("import sys; from reelrank.core import run_cli, write_params; "
                                 f"run_cli(lambda argv: write_params(argv, {str(out)!r}))"),
                "model@models.ease=no_such_model"], ROOT, check=False)
    assert proc.returncode == 1
    assert "Could not find 'model/no_such_model'" in proc.stderr and "ease" in proc.stderr
    assert not out.exists()


def test_dvc_composes_the_smoke_profile(smoke_project):
    params = yaml.safe_load((smoke_project / "params.yaml").read_text())
    assert params == compose_config(["profile=smoke"])


def test_every_stage_wrote_its_outputs(smoke_project):
    for name in MODELS:
        metrics = json.loads((smoke_project / "reports" / "metrics" / f"{name}.json").read_text())
        for part in ("val", "test"):
            assert {"ndcg@10", "recall@20", "hit_rate@10", "mrr@10", "coverage@10", "popularity@10"} <= set(metrics[part])
            assert 0.0 <= metrics[part]["ndcg@10"] <= 1.0
        recs = pd.read_parquet(smoke_project / "reports" / "recommendations" / f"{name}.parquet")
        assert list(recs.columns) == ["user_id", "rank", "item_id", "score"]
        assert recs.groupby("user_id")["rank"].max().max() == 100
    card = json.loads((smoke_project / "models" / "selected" / "card.json").read_text())
    best = max(MODELS, key=lambda n: card["leaderboard"][n]["val"]["ndcg@10"])
    assert card["selection"]["best_on_val"] == best and card["model"] == card["selection"]["chosen"]
    assert card["model"] in card["selection"]["candidates"]
    assert set(card["against_best_baseline"]["models"]) == set(MODELS) - {card["against_best_baseline"]["baseline"]}
    low, high = card["leaderboard"][card["model"]]["interval"]["test"]["ndcg@10"]
    assert low <= card["test"]["ndcg@10"] <= high
    assert len(card["provenance"]["git_commit"]) == 40 and card["provenance"]["data_md5"] != "unknown"
    assert (smoke_project / "models" / "selected" / "card.md").read_text().startswith("# Model card")


def test_recommendations_are_recomputable_from_the_files(smoke_project):
    "NDCG@10 recomputed from the top-k Parquet and the test split equals the metrics file."
    import numpy as np
    test = pd.read_parquet(smoke_project / "data" / "processed" / "test.parquet")
    recs = pd.read_parquet(smoke_project / "reports" / "recommendations" / "ease.parquet")
    relevant = test.groupby("user_id").item_id.apply(set)
    ndcgs = []
    for user, top in recs[recs["rank"] <= 10].groupby("user_id"):
        gains = [1 / np.log2(r + 1) for r, i in zip(top["rank"], top["item_id"]) if i in relevant[user]]
        ideal = sum(1 / np.log2(r + 2) for r in range(min(10, len(relevant[user]))))
        ndcgs.append(sum(gains) / ideal)
    metrics = json.loads((smoke_project / "reports" / "metrics" / "ease.json").read_text())
    assert abs(np.mean(ndcgs) - metrics["test"]["ndcg@10"]) < 1e-6


def stage_names(project) -> list[str]:
    "Every stage of the project's pipeline as DVC names them (foreach stages expanded: fit@ease, ...)."
    return list(yaml.safe_load((project / "dvc.lock").read_text())["stages"])


def output_mtimes(project) -> dict[str, int]:
    return {str(p.relative_to(project)): p.stat().st_mtime_ns for d in ("data", "models", "reports")
            for p in (project / d).rglob("*") if p.is_file()}


def test_second_repro_is_a_fast_no_op(smoke_project):
    before = output_mtimes(smoke_project)
    started = time.perf_counter()
    proc = run(["dvc", "repro"], smoke_project)
    elapsed = time.perf_counter() - started
    print(f"no-op dvc repro: {elapsed:.2f} s")
    skipped = set(re.findall(r"Stage '([^']+)' didn't change, skipping", proc.stdout + proc.stderr))
    assert skipped == set(stage_names(smoke_project)), proc.stdout
    assert "Running stage" not in proc.stdout + proc.stderr
    assert output_mtimes(smoke_project) == before


def test_data_stages_are_byte_identical_when_forced(smoke_project):
    def data_md5s():
        lock = yaml.safe_load((smoke_project / "dvc.lock").read_text())["stages"]
        return {stage: [out["md5"] for out in lock[stage]["outs"]] for stage in ("ingest", "validate", "split")}
    before = data_md5s()
    for stage in ("ingest", "validate", "split"):
        run(["dvc", "repro", "--force", "--single-item", stage], smoke_project)
    assert data_md5s() == before


def test_batch_recommend_cli(smoke_project):
    users = pd.read_parquet(smoke_project / "models" / "selected" / "interactions.parquet").user_id.unique()[:3]
    out = smoke_project / "batch.parquet"
    run(["python", "-m", "reelrank.recommend", "--users", *map(str, users), "999999999", "--k", "7",
         "--out", str(out)], smoke_project)
    recs = pd.read_parquet(out)
    assert recs.groupby("user_id").size().to_dict() == {**{int(u): 7 for u in users}, 999999999: 7}
    assert set(recs.loc[recs.user_id == 999999999, "fallback"]) == {"popularity"}
    seen = pd.read_parquet(smoke_project / "models" / "selected" / "interactions.parquet")
    overlap = recs.merge(seen, on=["user_id", "item_id"])
    assert overlap.empty, "seen items must be excluded"


@pytest.fixture()
def outputs_snapshot(smoke_project):
    "md5 of every data/model output, to prove a failed stage leaves them untouched."
    def snapshot():
        return {str(p.relative_to(smoke_project)): md5_file(p)
                for d in ("data", "models/selected") for p in sorted((smoke_project / d).rglob("*")) if p.is_file()}
    return snapshot


def test_corrupt_raw_file_fails_validate_and_keeps_outputs(smoke_project, outputs_snapshot):
    raw = smoke_project / "data" / "raw" / "interactions.parquet"
    original = raw.read_bytes()
    interim_before = {p.name: md5_file(p) for p in (smoke_project / "data" / "interim").iterdir()}
    try:
        raw.write_bytes(b"this is not parquet")
        proc = run(["python", "-m", "reelrank.data", "validate"], smoke_project, check=False)
        assert proc.returncode == 1
        assert "interactions.parquet" in proc.stderr and "Traceback" not in proc.stderr
        assert {p.name: md5_file(p) for p in (smoke_project / "data" / "interim").iterdir()} == interim_before
    finally:
        raw.write_bytes(original)


def test_schema_violating_file_source_names_rule_and_keeps_outputs(smoke_project, outputs_snapshot, tmp_path):
    before = outputs_snapshot()
    bad = tmp_path / "ratings.csv"
    bad.write_text("u,m,r,t\n1,10,4.0,1000000000\n1,11,9.5,1000000001\n2,10,3.0,1000000002\n")
    params_file = tmp_path / "params.yaml"
    params = compose_config(["data=file", f"data.path={bad}", "data.columns.user_id=u", "data.columns.item_id=m",
                             "data.columns.rating=r", "data.columns.timestamp=t"])
    params_file.write_text(yaml.safe_dump(params))
    raw_tmp = tmp_path / "raw"
    ingest = ("from reelrank.data import ingest; import yaml; "
              f"ingest(yaml.safe_load(open('{params_file}'))['data'], '{raw_tmp}')")
    run(["python", "-c", ingest], smoke_project)
    validate = ("from reelrank.core import run_cli; from reelrank.data import validate_stage; import yaml; "
                f"run_cli(lambda a: validate_stage(yaml.safe_load(open('{params_file}'))['validate'], '{raw_tmp}', "
                f"'data/interim', '{tmp_path}/validation.json'))")
    proc = run(["python", "-c", validate], smoke_project, check=False)
    assert proc.returncode == 1
    assert "rating_range" in proc.stderr and "1 " in proc.stderr and "rating=9.5" in proc.stderr
    assert outputs_snapshot() == before


def test_a_failed_stage_loses_nothing_dvc_checkout_restores_it(smoke_project, outputs_snapshot):
    "DVC removes a stage's outputs before running it; after a failure `dvc checkout` brings the last good ones back."
    before = outputs_snapshot()
    params = smoke_project / "params.yaml"
    original = params.read_text()
    try:
        composed = compose_config(["profile=smoke", "data=ml_100k",
                                   "data.url=http://127.0.0.1:9/ml-100k.zip", "data.download_dir=data/no_such_dir"])
        params.write_text(yaml.safe_dump(composed))
        started = time.perf_counter()
        proc = run(["dvc", "repro", "ingest"], smoke_project, check=False)
        assert time.perf_counter() - started < 30
        assert proc.returncode != 0
        assert "http://127.0.0.1:9/ml-100k.zip" in proc.stdout + proc.stderr
    finally:
        params.write_text(original)
    run(["dvc", "checkout"], smoke_project)
    assert outputs_snapshot() == before
    assert "Data and pipelines are up to date" in run(["dvc", "status"], smoke_project).stdout


def test_switching_a_parameter_back_restores_from_the_run_cache(smoke_project):
    "dvc exp run -S x=a, -S x=b, -S x=a: the third run trains nothing, DVC's run-cache restores every stage."
    def model_md5s():
        return {p.name: md5_file(p) for p in sorted((smoke_project / "models" / "ease").iterdir())}
    original, metrics = model_md5s(), (smoke_project / "reports" / "metrics" / "ease.json").read_text()
    changed = run(["dvc", "exp", "run", "-S", "profile=smoke", "-S", "models.ease.params.l2=300.0"], smoke_project)
    assert "Running stage 'fit@ease'" in changed.stdout
    started = time.perf_counter()
    back = run(["dvc", "exp", "run", "-S", "profile=smoke"], smoke_project)
    elapsed = time.perf_counter() - started
    print(f"switching back, restored from the run-cache in {elapsed:.1f} s")
    assert "Running stage" not in back.stdout, back.stdout
    assert "Stage 'fit@ease' is cached - skipping run, checking out outputs" in back.stdout
    assert model_md5s() == original
    assert (smoke_project / "reports" / "metrics" / "ease.json").read_text() == metrics
    assert "Data and pipelines are up to date" in run(["dvc", "status"], smoke_project).stdout


def test_dvc_remote_push_pull_round_trip(smoke_project, tmp_path):
    "Outputs pushed to a local-directory remote come back byte-identical in a fresh copy of the project."
    from conftest import copy_project
    remote = tmp_path / "remote"
    run(["dvc", "remote", "add", "--local", "-f", "store", str(remote)], smoke_project)
    run(["dvc", "push", "-r", "store"], smoke_project)
    clone = copy_project(tmp_path / "clone")
    for name in ("dvc.lock", "params.yaml"):
        (clone / name).write_bytes((smoke_project / name).read_bytes())
    run(["dvc", "remote", "add", "--local", "-f", "store", str(remote)], clone)
    run(["dvc", "pull", "-r", "store"], clone)
    for part in ("data/processed", "models/selected"):
        pulled = {p.relative_to(clone): md5_file(p) for p in sorted((clone / part).rglob("*")) if p.is_file()}
        original = {p.relative_to(smoke_project): md5_file(p) for p in sorted((smoke_project / part).rglob("*"))
                    if p.is_file()}
        assert pulled and pulled == original
