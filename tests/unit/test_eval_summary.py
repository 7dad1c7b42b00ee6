"""summary.json: the issue's shape, relative change, absent sets, JSON-safety."""
import json
import math

import pytest

from evaluation import (build_summary, flatten_metrics, lower_is_better, read_summary, relative_change,
                        write_summary)


def test_relative_change() -> None:
    assert relative_change(0.64, 0.61) == pytest.approx(-0.046875)
    assert relative_change(0.02, 0.81) == pytest.approx(39.5)
    assert relative_change(-2.0, -1.0) == pytest.approx(0.5)  # divided by |before|
    assert relative_change(0.0, 0.5) is None                  # undefined: documented as null
    assert relative_change(None, 0.5) is None and relative_change(0.5, None) is None
    assert relative_change(math.nan, 0.5) is None and relative_change(1.0, math.inf) is None


def test_build_summary_issue_shape(tmp_path) -> None:
    before = flatten_metrics({"new_facts": {"f1": 0.02, "em": 0.0}, "known_facts": {"f1": 0.64},
                              "heldout_text": {"nll": 3.1}})
    after = {"new_facts/f1": 0.81, "new_facts/em": 0.5, "known_facts/f1": 0.61, "heldout_text/nll": 3.12}
    s = build_summary(stage="finetune", method="sparse", steps=1000, wall_time_s=812.5,
                      trainable_params_per_step=512000, before=before, after=after)
    assert list(s) == ["stage", "method", "steps", "wall_time_s", "trainable_params_per_step", "metrics"]
    assert s["metrics"]["new_facts/f1"] == {"before": 0.02, "after": 0.81, "rel_change": pytest.approx(39.5)}
    assert s["metrics"]["new_facts/em"] == {"before": 0.0, "after": 0.5, "rel_change": None}
    assert s["metrics"]["heldout_text/nll"]["rel_change"] == pytest.approx(0.02 / 3.1)
    # Sets not evaluated are absent, not zero.
    assert "nq/f1" not in s["metrics"] and "hellaswag/acc" not in s["metrics"]
    path = tmp_path / "run" / "summary.json"
    write_summary(path, s)
    assert json.loads(path.read_text()) == read_summary(path)
    assert read_summary(path)["metrics"]["new_facts/em"]["rel_change"] is None
    assert not list(path.parent.glob("*.tmp"))


def test_one_sided_and_non_finite_metrics_are_null() -> None:
    s = build_summary(stage="finetune", method="full", steps=3, wall_time_s=1.0, trainable_params_per_step=None,
                      before={"nq/f1": 0.1, "gsm8k/nll": 1.5}, after={"gsm8k/nll": math.nan, "hellaswag/acc": 0.3})
    assert list(s["metrics"]) == ["gsm8k/nll", "hellaswag/acc", "nq/f1"]
    assert s["metrics"]["gsm8k/nll"] == {"before": 1.5, "after": None, "rel_change": None}
    assert s["metrics"]["hellaswag/acc"] == {"before": None, "after": 0.3, "rel_change": None}
    assert s["metrics"]["nq/f1"] == {"before": 0.1, "after": None, "rel_change": None}
    json.dumps(s, allow_nan=False)  # valid strict JSON
    s = build_summary(stage="pretrain", method="full", steps=1, wall_time_s=0.0, trainable_params_per_step=5,
                      before=None, after=None)
    assert s["metrics"] == {}


def test_bad_names_and_bad_files(tmp_path) -> None:
    with pytest.raises(ValueError, match="<set>/<metric>"):
        build_summary(stage="s", method="m", steps=1, wall_time_s=0, trainable_params_per_step=1,
                      before=None, after={"f1": 0.1})
    with pytest.raises(ValueError):
        flatten_metrics({"a/b": {"f1": 1.0}})
    (tmp_path / "summary.json").write_text('{"stage": "x"}')
    with pytest.raises(ValueError, match="missing key"):
        read_summary(tmp_path / "summary.json")
    (tmp_path / "summary.json").write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        read_summary(tmp_path / "summary.json")


def test_lower_is_better() -> None:
    assert lower_is_better("gsm8k/nll") and lower_is_better("heldout_text/nll")
    assert not lower_is_better("known_facts/f1") and not lower_is_better("hellaswag/acc")
