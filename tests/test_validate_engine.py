"""The validate stage on DuckDB against the pandas reference (`validate_tables`, built on `validate`): the same rows,
order and dtypes in data/interim, the same report, the same error messages. On the embedded MovieLens sample as
`python -m reelrank.data` writes and validates it, and on small frames built to break each rule under both
policies, with increments appended; a failing run leaves the previous outputs intact."""
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import run

from reelrank.core import compose_config, md5_file, read_json
from reelrank.data import (
    INTERACTIONS_SCHEMA,
    RULES,
    DataValidationError,
    items_frame,
    read_tables,
    validate_stage,
    validate_tables,
    write_tables,
)

RULES_CFG = {"rating_range": [0.5, 5.0], "timestamp_window": ["1995-01-01", "2031-01-01"],
             "engine": {"memory_limit": "256MB", "threads": 2}}
T0 = 1_000_000_000  # 2001-09-09, inside the window


def adversarial_raw() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Raw tables breaking every rule more than MAX_EXAMPLES times, in shuffled file order: repeated keys (three and
    four times, some at the same second with different ratings), null keys (one of which also repeats), ratings at
    and beyond both bounds in float32, NaN ratings (implicit, fine), timestamps at and beyond the window's ends, and
    unknown items (with null users too, which only `null_keys` counts)."""
    rng = np.random.default_rng(0)
    rows = [(user, item, T0 + 60 * item, float(rng.choice([0.5, 1.0, 3.5, 5.0]))) for user in range(1, 30)
            for item in range(1, 15)]
    rows += [(user, item, T0 + 60 * item, 2.0) for user in range(1, 8) for item in (2, 3)]       # repeated keys
    rows += [(user, 2, T0 + 120, 4.5) for user in range(1, 4)]                                   # a third time
    rows += [(None, 3, T0, 3.0)] * 2 + [(7, None, T0, 3.0), (None, None, T0, 9.0), (None, 99, T0, 3.0)]
    rows += [(40 + k, 5, T0 + k, rating) for k, rating in enumerate([0.49, 5.01, 0.0, 7.0, -1.0, 5.5, 0.5, 5.0])]
    rows += [(50 + k, 6, t, 3.0) for k, t in enumerate([788_918_399, 788_918_400, 1_924_992_000, 1_924_991_999,
                                                         0, 2_000_000_000, 1, 1_924_992_001])]
    rows += [(60 + k, 100 + k % 3, T0, 3.0) for k in range(8)]                                   # unknown items
    rows += [(70, 7, T0, None), (71, 8, T0, float("nan"))]
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "rating"])
    frame = frame.sample(frac=1, random_state=3, ignore_index=True)[INTERACTIONS_SCHEMA.names]
    frame = frame.astype({"user_id": "Int64", "item_id": "Int64", "rating": "float32", "timestamp": "int64"})
    return frame, items_frame(range(1, 20), genres=["Drama"] * 19)


def run_both(tmp_path, interactions, items, rules, increments=()):
    """Write the raw tables (and increments into accepted/), run the DuckDB stage and the reference on them.
    Returns (stage report, reference report) after checking the written tables equal the reference's."""
    raw, accepted = tmp_path / "raw", tmp_path / "accepted"
    write_tables(interactions, items, raw)
    accepted.mkdir(exist_ok=True)
    for number, increment in enumerate(increments):
        write_tables(increment, items, tmp_path / "increment")
        shutil.move(tmp_path / "increment" / "interactions.parquet", accepted / f"{number:02d}.parquet")
    accepted_dir = accepted if increments else None
    report = validate_stage(rules, raw, tmp_path / "interim", tmp_path / "validation.json", accepted_dir)
    expected, expected_items, expected_report = validate_tables(rules, raw, accepted_dir)
    written, written_items = read_tables(tmp_path / "interim")
    pd.testing.assert_frame_equal(written, expected)  # rows, order and dtypes
    pd.testing.assert_frame_equal(written_items, expected_items)
    assert read_json(tmp_path / "validation.json") == report == expected_report
    return report, expected_report


def reference_error(interactions, items, rules, tmp_path) -> str:
    write_tables(interactions, items, tmp_path / "reference-raw")
    with pytest.raises(DataValidationError) as raised:
        validate_tables(rules, tmp_path / "reference-raw")
    return str(raised.value)


def test_the_stage_writes_exactly_the_reference_on_the_sample(tmp_path):
    "`python -m reelrank.data ingest` then `validate` of the default source, as DVC runs them."
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(compose_config()))
    run(["python", "-m", "reelrank.data", "ingest"], tmp_path)
    run(["python", "-m", "reelrank.data", "validate"], tmp_path)
    expected, expected_items, expected_report = validate_tables(compose_config()["validate"], tmp_path / "data" / "raw",
                                                                tmp_path / "data" / "accepted")
    written, written_items = read_tables(tmp_path / "data" / "interim")
    assert len(written) == 100_004
    pd.testing.assert_frame_equal(written, expected)
    pd.testing.assert_frame_equal(written_items, expected_items)
    assert read_json(tmp_path / "reports" / "validation.json") == expected_report
    assert sorted(path.name for path in (tmp_path / "data").iterdir()) == ["interim", "raw"]  # no scratch left
    first = md5_file(tmp_path / "data" / "interim" / "interactions.parquet")
    run(["python", "-m", "reelrank.data", "validate"], tmp_path)
    assert md5_file(tmp_path / "data" / "interim" / "interactions.parquet") == first  # reruns write the same bytes


def test_every_rule_dropped_matches_the_reference(tmp_path):
    interactions, items = adversarial_raw()
    report, _ = run_both(tmp_path, interactions, items, {**RULES_CFG, "policy": dict.fromkeys(RULES, "drop")})
    assert {rule: entry["violations"] for rule, entry in report["rules"].items()} == {
        "null_keys": 5, "duplicates": 17, "rating_range": 7, "timestamp_window": 6, "unknown_items": 8}
    assert all(len(entry["examples"]) == 5 for entry in report["rules"].values())


def rule_flags(interactions: pd.DataFrame, items: pd.DataFrame) -> pd.DataFrame:
    "Which rules each row of a raw frame breaks, by the definitions of the validate notebook's table."
    null_key = interactions.user_id.isna() | interactions.item_id.isna()
    return pd.DataFrame({
        "null_keys": null_key,
        "duplicates": ~null_key & interactions.duplicated(["user_id", "item_id", "timestamp"]),
        "rating_range": ~(interactions.rating.isna() | interactions.rating.between(0.5, 5.0)),
        "timestamp_window": ~interactions.timestamp.between(788_918_400, 1_924_991_999),
        "unknown_items": ~null_key & ~interactions.item_id.isin(items.item_id),
    })


@pytest.mark.parametrize("rule", RULES)
def test_each_rule_alone_dropped_while_the_others_fail_matches_the_reference(tmp_path, rule):
    interactions, items = adversarial_raw()
    others = [other for other in RULES if other != rule]
    only_this_rule = interactions[~rule_flags(interactions, items)[others].any(axis=1)].reset_index(drop=True)
    report, _ = run_both(tmp_path, only_this_rule, items, {**RULES_CFG, "policy": {**dict.fromkeys(others, "fail"),
                                                                                    rule: "drop"}})
    assert report["rules"][rule]["dropped"] > 0
    assert all(report["rules"][other]["violations"] == 0 for other in others)


@pytest.mark.parametrize("rule", RULES)
def test_a_failing_rule_names_itself_as_the_reference_does_and_keeps_outputs(tmp_path, rule):
    interactions, items = adversarial_raw()
    rules = {**RULES_CFG, "policy": {**dict.fromkeys(RULES, "drop"), rule: "fail"}}
    good = interactions[~rule_flags(interactions, items).any(axis=1)]
    run_both(tmp_path, good, items, rules)  # a good run first: its outputs must survive the failing one
    before = {name: md5_file(tmp_path / "interim" / name) for name in ("interactions.parquet", "items.parquet")}
    report_before = (tmp_path / "validation.json").read_bytes()
    write_tables(interactions, items, tmp_path / "raw")
    with pytest.raises(DataValidationError) as raised:
        validate_stage(rules, tmp_path / "raw", tmp_path / "interim", tmp_path / "validation.json")
    message = str(raised.value)
    assert message == reference_error(interactions, items, rules, tmp_path)
    assert message.startswith(f"rule '{rule}' failed: ") and message.count("\n ") == 5  # five example rows
    assert {name: md5_file(tmp_path / "interim" / name) for name in before} == before
    assert (tmp_path / "validation.json").read_bytes() == report_before
    assert not list(tmp_path.glob(".*"))  # neither a half-written output nor DuckDB's scratch folder


def test_every_rule_failing_at_once_gives_the_reference_message(tmp_path):
    interactions, items = adversarial_raw()
    rules = {**RULES_CFG, "policy": dict.fromkeys(RULES, "fail")}
    write_tables(interactions, items, tmp_path / "raw")
    with pytest.raises(DataValidationError) as raised:
        validate_stage(rules, tmp_path / "raw", tmp_path / "interim", tmp_path / "validation.json")
    assert str(raised.value) == reference_error(interactions, items, rules, tmp_path)
    assert [line.split("'")[1] for line in str(raised.value).splitlines() if line.startswith("rule")] == RULES
    assert not (tmp_path / "interim").exists()


def test_switched_off_rules_and_tricky_float_bounds_match_the_reference(tmp_path):
    interactions, items = adversarial_raw()
    rules = {"rating_range": [0.1, 4.9], "timestamp_window": None, "policy": dict.fromkeys(RULES, "drop")}
    interactions.loc[:3, "rating"] = np.float32([0.1, 4.9, 0.099999994, 4.9000006])  # float32 neighbours of bounds
    report, _ = run_both(tmp_path, interactions, items, rules)
    assert "timestamp_window" not in report["rules"]


def test_increments_are_appended_and_sorted_as_the_reference_does(tmp_path):
    interactions, items = adversarial_raw()
    later = interactions.iloc[::3].assign(rating=np.float32(2.5))  # repeats of raw keys, in another file
    latest = interactions.iloc[1::4].assign(timestamp=lambda f: f.timestamp + 1)
    report, _ = run_both(tmp_path, interactions, items, {**RULES_CFG, "policy": dict.fromkeys(RULES, "drop")},
                         increments=[later, latest])
    assert report["increments"] == {"00.parquet": len(later), "01.parquet": len(latest)}
    assert report["before"]["interactions"] == len(interactions) + len(later) + len(latest)


def test_schema_errors_are_checked_on_the_head_and_null_timestamps_exactly(tmp_path):
    interactions, items = adversarial_raw()
    write_tables(interactions, items, tmp_path / "raw")
    bad = interactions.astype({"rating": "float64"})
    bad.to_parquet(tmp_path / "raw" / "interactions.parquet", index=False)
    with pytest.raises(DataValidationError, match=r"schema check 'dtype\('float32'\)' failed on interactions.rating"):
        validate_stage(RULES_CFG, tmp_path / "raw", tmp_path / "interim", tmp_path / "validation.json")
    late_null = pd.concat([interactions.dropna()] * 800, ignore_index=True)  # more rows than the head sample
    late_null = late_null.astype({"timestamp": "Int64"})
    late_null.loc[len(late_null) - 1, "timestamp"] = pd.NA
    late_null.to_parquet(tmp_path / "raw" / "interactions.parquet", index=False)
    with pytest.raises(DataValidationError, match=r"failed on interactions.timestamp: 1 case\(s\)"):
        validate_stage(RULES_CFG, tmp_path / "raw", tmp_path / "interim", tmp_path / "validation.json")
    assert not (tmp_path / "interim").exists()


def test_many_row_groups_keep_their_order_when_nothing_is_dropped(tmp_path):
    "The streaming copy (nothing dropped, no increments) keeps file order across row groups read by two threads."
    rng = np.random.default_rng(1)
    n = 60_000
    interactions = pd.DataFrame({"user_id": rng.integers(1, 500, n), "item_id": rng.integers(1, 20, n),
                                 "rating": rng.choice(np.float32([1, 2.5, 4]), n),
                                 "timestamp": T0 + np.arange(n)})
    items = items_frame(range(1, 20))
    write_tables(interactions, items, tmp_path / "raw")
    pq.write_table(pa.Table.from_pandas(interactions, schema=INTERACTIONS_SCHEMA, preserve_index=False),
                   tmp_path / "raw" / "interactions.parquet", row_group_size=500)
    report = validate_stage(RULES_CFG, tmp_path / "raw", tmp_path / "interim", tmp_path / "validation.json")
    assert report["after"]["interactions"] == n
    pd.testing.assert_frame_equal(read_tables(tmp_path / "interim")[0], interactions)
