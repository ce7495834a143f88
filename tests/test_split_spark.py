"""`split_on_spark` runs the split's SQL text on a local Spark (`local[2]`) and writes exactly `duckdb_split`'s parts:
the same rows, order and column types, on the embedded MovieLens sample and on the adversarial frame (read by Spark
in several tasks). The session is offline: driver and block manager on 127.0.0.1, no UI; it stops after the module.
PySpark and a Java runtime come from `make spark-deps` and `make system-deps`, which `make test` runs."""
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import ADVERSARIAL_FRACTIONS, adversarial_interactions

from reelrank.core import DataError, compose_config
from reelrank.split import PARTS, duckdb_split, split_on_spark

# PySpark 4.3 warns at start-up that it does not fully support pandas 3; the split never converts between Spark and
# pandas frames (Parquet in, Parquet out), and the comparison reads the files with pandas alone
pytestmark = pytest.mark.filterwarnings("ignore:PySpark does not yet fully support pandas:FutureWarning")


@pytest.fixture(scope="module")
def spark():
    "A local Spark on 2 cores bound to 127.0.0.1, without its web UI."
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        pytest.fail("pyspark is missing: `make spark-deps` installs the optional dependency group `spark`")
    started = time.perf_counter()
    session = (SparkSession.builder.master("local[2]").appName("reelrank-split-test")
               .config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
               .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
               # the default 200 shuffle partitions would make most of the test's time tasks of a few hundred rows
               .config("spark.sql.shuffle.partitions", "4")
               .getOrCreate())
    session.sparkContext.setLogLevel("ERROR")
    print(f"Spark session started in {time.perf_counter() - started:.1f} s")
    yield session
    session.stop()


def split_both_ways(interactions: Path, out: Path, cfg: dict) -> dict[str, int]:
    "Split `interactions` with DuckDB into out/duckdb and with Spark into out/spark; assert the parts are equal."
    (out / "duckdb").mkdir(parents=True)
    counts = duckdb_split(interactions, out / "duckdb", cfg)
    assert split_on_spark(interactions, out / "spark", cfg) == counts
    for part in PARTS:
        expected = pd.read_parquet(out / "duckdb" / f"{part}.parquet")
        folder = out / "spark" / f"{part}.parquet"
        assert len(list(folder.glob("*.parquet"))) == 1    # one file per part, so its order is the whole part's
        pd.testing.assert_frame_equal(pd.read_parquet(folder), expected)  # same rows, order and dtypes
        spark_types = [(field.name, field.type) for field in pq.read_table(folder).schema]
        assert spark_types == [(field.name, field.type) for field in pq.read_schema(out / "duckdb" / f"{part}.parquet")]
    return counts


def test_spark_writes_duckdbs_split_of_the_sample(spark, sample_project, tmp_path):
    started = time.perf_counter()
    counts = split_both_ways(sample_project / "data" / "interim" / "interactions.parquet", tmp_path,
                             compose_config()["split"])
    assert counts == {"train": 79_942, "val": 10_031, "test": 10_031}
    print(f"both splits of the sample: {time.perf_counter() - started:.1f} s")


def test_spark_breaks_ties_and_rounds_as_duckdb_on_the_adversarial_frame(spark, tmp_path):
    started = time.perf_counter()
    frame = adversarial_interactions()
    interactions = tmp_path / "interactions.parquet"
    frame.to_parquet(interactions, index=False, row_group_size=16)
    # the tie-breaker must hold across tasks: two ratings of a pair in the same second lie in different row groups
    row_group = pd.Series(frame.index // 16, index=frame.index)
    ties = frame[frame.duplicated(["user_id", "item_id", "timestamp"], keep=False)]
    assert (row_group[ties.index].groupby([ties.user_id, ties.item_id]).nunique() > 1).any()
    spark.conf.set("spark.sql.files.maxPartitionBytes", "2048")  # input splits of a few row groups each
    try:
        assert spark.read.parquet(str(interactions)).rdd.getNumPartitions() > 1
        for fraction in ADVERSARIAL_FRACTIONS:
            counts = split_both_ways(interactions, tmp_path / f"out-{fraction}",
                                     {"holdout_fraction": fraction, "min_interactions": 5})
            assert counts["test"] > 0 and sum(counts.values()) == len(frame.drop_duplicates(["user_id", "item_id"]))
    finally:
        spark.conf.unset("spark.sql.files.maxPartitionBytes")
    print(f"both splits of the adversarial frame at {len(ADVERSARIAL_FRACTIONS)} fractions: "
          f"{time.perf_counter() - started:.1f} s")


def test_a_missing_input_is_a_data_error(spark, tmp_path):
    with pytest.raises(DataError, match="cannot read .*missing.parquet"):
        split_on_spark(tmp_path / "missing.parquet", tmp_path / "out", {"holdout_fraction": 0.1, "min_interactions": 5})
