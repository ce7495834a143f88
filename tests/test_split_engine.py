"""The split stage on DuckDB against the pandas reference (`temporal_split`) on the embedded MovieLens sample: the
same rows, order and dtypes in each part, byte-identical reruns, and a clear error when DuckDB's memory is too small.
The stage runs as DVC runs it (`python -m reelrank.split` in a project folder), on the data the ingest and validate
stages write for the default profile."""
import shutil

import pandas as pd
import pytest
import yaml
from conftest import ADVERSARIAL_FRACTIONS, adversarial_interactions, run

from reelrank.core import DataError, compose_config, md5_file
from reelrank.split import PARTS, SplitData, duckdb_split, temporal_split

FILES = (*PARTS, "items")


def test_the_stage_keeps_exactly_the_reference_rows_on_the_sample(sample_project):
    run(["python", "-m", "reelrank.split"], sample_project)
    interactions = pd.read_parquet(sample_project / "data" / "interim" / "interactions.parquet")
    assert len(interactions) == 100_004
    cfg = compose_config()["split"]
    reference = temporal_split(interactions, cfg["holdout_fraction"], cfg["min_interactions"])
    split = SplitData.load(sample_project / "data" / "processed")
    for part in PARTS:
        pd.testing.assert_frame_equal(split.frames[part], reference[part])  # same rows, order and dtypes
    assert {part: len(split.frames[part]) for part in PARTS} == {"train": 79_942, "val": 10_031, "test": 10_031}


def test_reruns_write_identical_bytes(sample_project):
    processed = sample_project / "data" / "processed"
    run(["python", "-m", "reelrank.split"], sample_project)
    shutil.copytree(processed, sample_project / "data" / "first")
    run(["python", "-m", "reelrank.split"], sample_project)
    for name in FILES:
        assert md5_file(sample_project / "data" / "first" / f"{name}.parquet") == md5_file(processed / f"{name}.parquet")


def test_adversarial_ties_and_rounding_edges_match_the_reference(tmp_path):
    "Duplicates at the same second in shuffled file order, users below min_interactions, hold-outs at rounding edges."
    frame = adversarial_interactions()
    frame.to_parquet(tmp_path / "interactions.parquet", index=False)
    for fraction in ADVERSARIAL_FRACTIONS:
        out = tmp_path / f"out-{fraction}"
        out.mkdir()
        counts = duckdb_split(tmp_path / "interactions.parquet", out, {"holdout_fraction": fraction,
                                                                        "min_interactions": 5})
        reference = temporal_split(frame, fraction, 5)
        for part in PARTS:
            pd.testing.assert_frame_equal(pd.read_parquet(out / f"{part}.parquet"), reference[part])
        assert counts == {part: len(rows) for part, rows in reference.items()}
        assert reference["test"].user_id.min() == 5  # users 1-4 stay in train


def test_too_little_memory_is_a_clear_error_and_leaves_no_scratch(sample_project, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DataError, match="ran out of memory: raise split.engine.memory_limit"):
        duckdb_split(sample_project / "data" / "interim" / "interactions.parquet", out,
                     {"holdout_fraction": 0.1, "min_interactions": 5,
                      "engine": {"memory_limit": "1MB", "threads": 1, "temp_directory": str(tmp_path / "spill")}})
    assert list((tmp_path / "spill").iterdir()) == []


def test_a_missing_input_names_the_stage_to_run(tmp_path):
    proc = run(["python", "-m", "reelrank.split", "--params", str(tmp_path / "params.yaml")], tmp_path, check=False)
    assert proc.returncode != 0 and "params.yaml not found" in proc.stderr
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"split": compose_config()["split"]}))
    (tmp_path / "data" / "interim").mkdir(parents=True)
    pd.DataFrame({"item_id": [1], "title": "t", "genres": "", "year": 2000}).to_parquet(
        tmp_path / "data" / "interim" / "items.parquet")
    proc = run(["python", "-m", "reelrank.split"], tmp_path, check=False)
    assert proc.returncode != 0
    assert "interactions.parquet not found: run the validate stage first" in proc.stderr
    assert not (tmp_path / "data" / "processed").exists()
