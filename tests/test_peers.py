"""The peer benchmark (tests/benchmarks/bench_peers.py) scores a peer library's ranked lists with this project's
evaluator; these tests guard that conversion: our own model's lists, passed through it, score exactly as the
normal evaluation path scores the model, and lists that break the protocol are refused."""
import sys

import numpy as np
import pytest
from conftest import ROOT, write_toy_split

from reelrank.models.base import build_model
from reelrank.split import SplitData
from reelrank.train import recommendations_frame, score_task

sys.path.insert(0, str(ROOT / "tests" / "benchmarks"))
from bench_peers import evaluate_ranked_lists

EVAL = {"cutoffs": [5, 10, 20, 50], "save_k": 100, "batch_size": 16}


@pytest.fixture(scope="module")
def ease_on_test(tmp_path_factory):
    "EASE^R refit on train + val of a toy split, its test task, and the normal path's evaluation of it."
    processed = tmp_path_factory.mktemp("peers") / "processed"
    write_toy_split(processed, n_users=60, n_items=300, per_user=40)
    split = SplitData.load(processed)
    fitting, task = split.fitting(["train", "val"]), split.holdout("test")
    model = build_model("ease", split.catalog, {"l2": 50.0}).fit(fitting)
    return split, fitting, task, model, score_task(model, task, fitting, EVAL)


def test_our_lists_through_the_converter_score_as_the_normal_path(ease_on_test):
    split, fitting, task, model, normal = ease_on_test
    lists = recommendations_frame(normal, task, model)[["user_id", "item_id", "rank"]]
    converted = evaluate_ranked_lists(lists, task, split.catalog, fitting, EVAL)
    assert converted.metrics == normal.metrics
    np.testing.assert_array_equal(converted.top_items, normal.top_items)
    for name, values in normal.per_user.items():
        np.testing.assert_array_equal(converted.per_user[name], values, err_msg=name)


def test_the_converter_follows_the_lists_order(ease_on_test):
    split, fitting, task, model, normal = ease_on_test
    lists = recommendations_frame(normal, task, model)[["user_id", "item_id", "rank"]]
    reversed_lists = lists.assign(rank=lists.groupby("user_id")["rank"].transform("max") + 1 - lists["rank"])
    converted = evaluate_ranked_lists(reversed_lists, task, split.catalog, fitting, EVAL)
    assert (normal.top_items >= 0).all()
    np.testing.assert_array_equal(converted.top_items, normal.top_items[:, ::-1])


def test_lists_with_seen_items_are_refused(ease_on_test):
    split, fitting, task, model, normal = ease_on_test
    lists = recommendations_frame(normal, task, model)[["user_id", "item_id", "rank"]]
    user = int(task.histories.user_ids[0])
    seen_item = int(split.catalog.item_ids[task.histories.histories[0][0]])
    with_seen = lists.copy()
    with_seen.loc[with_seen.index[(with_seen.user_id == user).to_numpy()][0], "item_id"] = seen_item
    with pytest.raises(ValueError, match="already seen by their user"):
        evaluate_ranked_lists(with_seen, task, split.catalog, fitting, EVAL)
