"""Quality files: bad ones are refused with the key and the value."""

from __future__ import annotations

import pytest
import yaml

from lightning_prune.core.sensitivity import load_quality
from lightning_prune.core.sensitivity.quality import criterion_path, criterion_yaml


def test_load_quality_refuses_bad_files(tmp_path):
    (tmp_path / "q.yaml").write_text("quality: {fc1: -1}\n")
    with pytest.raises(ValueError, match=r"`quality\['fc1'\]` must be a finite number >= 0, got -1"):
        load_quality(tmp_path / "q.yaml")
    (tmp_path / "q.json").write_text('{"quality": {"fc1": 1}, "amount": {"fc1": 0.5}}')
    with pytest.raises(ValueError, match=r"must hold one mapping: `criterion` \(a name\) and one set of levels"):
        load_quality(tmp_path / "q.json")
    (tmp_path / "c.yaml").write_text("criterion: [std]\nquality: 1.0\n")
    with pytest.raises(ValueError, match=r"must hold one mapping: `criterion` \(a name\)"):
        load_quality(tmp_path / "c.yaml")


def test_load_quality_reads_old_and_new_files(tmp_path):
    (tmp_path / "old.yaml").write_text("quality: {fc1: 1.5}\n")
    assert load_quality(tmp_path / "old.yaml") == {"quality": {"fc1": 1.5}}
    (tmp_path / "old.json").write_text('{"criterion": "fraction", "amount": {"fc1": 0.9}}')
    assert load_quality(tmp_path / "old.json") == {"criterion": "fraction", "amount": {"fc1": 0.9}}
    (tmp_path / "mine.yaml").write_text("criterion: largest\ncount: {fc1: 100}\n")  # a criterion of one's own
    assert load_quality(tmp_path / "mine.yaml") == {"criterion": "largest", "count": {"fc1": 100}}


def test_criterion_yaml_block_and_paths():
    text = criterion_yaml("lightning_prune.Std", {"quality": {"fc1": 1.5, "fc2": 0.5}}, "note")
    assert text.splitlines()[0] == "# note"
    assert yaml.safe_load(text) == {
        "criterion": {"class_path": "lightning_prune.Std", "init_args": {"quality": {"fc1": 1.5, "fc2": 0.5}}}
    }
    assert criterion_path("std") == "lightning_prune.core.criteria.Std"
    assert criterion_path("not-registered") == "not-registered"
