"""Integration tests of the synthetic source (reelrank.synthetic): `data=synthetic` composed from conf/ with tiny
sizes runs through the data stages (ingest, validate, split) as `dvc repro` runs them, in a temporary directory;
the chunked writer gives the same bytes for the same config and the same rows as the ingest stage."""
import subprocess
import sys

import pandas as pd
import pyarrow.parquet as pq
import yaml

from reelrank import synthetic
from reelrank.core import compose_config, md5_file, read_json
from reelrank.synthetic import load_synthetic, write_synthetic

TINY = ["data=synthetic", "data.users=120", "data.items=500", "data.interactions=6000", "data.seed=7"]
STAGES = (["reelrank.data", "ingest"], ["reelrank.data", "validate"], ["reelrank.split"])


def run_stage(module: list[str], cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *module], cwd=cwd, capture_output=True, text=True, check=False)


def test_data_stages_run_on_the_synthetic_source(tmp_path):
    params = compose_config(TINY)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for module in STAGES:
        done = run_stage(module, tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
    report = read_json(tmp_path / "reports" / "validation.json")
    assert report["before"] == report["after"] == {"interactions": 6000, "items": 500}
    assert {rule: entry["violations"] for rule, entry in report["rules"].items()} == dict.fromkeys(report["rules"], 0)
    parts = {part: pd.read_parquet(tmp_path / "data" / "processed" / f"{part}.parquet") for part in ("train", "val",
                                                                                                     "test")}
    assert sum(map(len, parts.values())) == 6000  # no (user, movie) pair repeats
    # every user has at least min_per_user (20) ratings, so every user is in val and test
    assert parts["val"].user_id.nunique() == parts["test"].user_id.nunique() == 120
    # the chunked writer gives exactly the rows the ingest stage wrote
    write_synthetic(params["data"], tmp_path / "chunked")
    for table in ("interactions", "items"):
        pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "data" / "raw" / f"{table}.parquet"),
                                      pd.read_parquet(tmp_path / "chunked" / f"{table}.parquet"))


def test_an_impossible_size_stops_ingest_naming_the_rule(tmp_path):
    params = compose_config([*TINY, "data.interactions=100"])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    failed = run_stage(["reelrank.data", "ingest"], tmp_path)
    assert failed.returncode == 1
    assert failed.stderr.startswith("error: data.interactions must lie between data.users x data.min_per_user (2,400)")


def test_same_config_same_bytes_another_seed_other_data(tmp_path):
    cfg = compose_config(TINY)["data"]
    for name, seed in (("first", 7), ("again", 7), ("other", 8)):
        write_synthetic({**cfg, "seed": seed}, tmp_path / name)
    md5 = {name: [md5_file(tmp_path / name / f"{table}.parquet") for table in ("interactions", "items")]
           for name in ("first", "again", "other")}
    assert md5["first"] == md5["again"]
    assert md5["first"][0] != md5["other"][0] and md5["first"][1] != md5["other"][1]


def test_blocks_become_row_groups_of_one_file(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic, "BLOCK_ROWS", 1000)  # blocks of about 1000 ratings: 20 users each here
    cfg = compose_config(TINY)["data"]
    blocks = list(synthetic.user_blocks(synthetic.SyntheticConfig.from_config(cfg)))
    assert len(blocks) == 6 and blocks[-1][2] == 120
    write_synthetic(cfg, tmp_path / "raw")
    assert pq.ParquetFile(tmp_path / "raw" / "interactions.parquet").num_row_groups == len(blocks)
    interactions, _ = load_synthetic(cfg)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "raw" / "interactions.parquet"), interactions)
    assert len(interactions) == 6000 and interactions.user_id.is_monotonic_increasing
