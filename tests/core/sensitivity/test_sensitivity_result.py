"""The result: the levels it chooses, its YAML, its argument checks."""

from __future__ import annotations

import math

import pytest
import yaml
from sensitivity_cases import (
    make_result,
)


def test_choose_is_monotone_relative_and_falls_back_to_zero():
    result = make_result(
        {
            "conv1": [(0.5, 0.4, 0.85), (1.0, 0.7, 0.8)],  # even the smallest level is too much
            "conv2": [(0.5, 0.4, 0.9), (1.0, 0.7, 0.7), (1.5, 0.85, 0.9)],  # recovers: not chosen
            "fc1": [(0.5, 0.4, 0.9), (1.0, 0.7, 0.895), (1.5, 0.9, 0.89), (9.0, 1.0, 0.9)],  # 9.0 empties it
        }
    )
    assert result.choose(0.01) == {"conv1": 0.0, "conv2": 0.5, "fc1": 1.5}
    assert result.choose(0.005) == {"conv1": 0.0, "conv2": 0.5, "fc1": 1.0}
    assert result.choose(0.1, relative=True) == {"conv1": 0.5, "conv2": 0.5, "fc1": 1.5}
    assert result.choose(0.1 / 0.9, relative=True)["conv1"] == 1.0
    text = result.quality_yaml(0.01)
    assert text.splitlines()[4] == "    quality: {conv1: 0.0, conv2: 0.5, fc1: 1.5}"
    assert yaml.safe_load(text)["criterion"]["init_args"] == {"quality": {"conv1": 0.0, "conv2": 0.5, "fc1": 1.5}}
    loss = make_result({"fc": [(1.0, 0.5, 0.31), (2.0, 0.9, 0.5)]}, baseline=0.3, higher_is_better=False)
    assert loss.choose(0.02) == {"fc": 1.0}


def test_quality_yaml_of_many_layers_is_written_one_per_line_and_quotes_odd_names():
    result = make_result({f"features.{i}": [(1.0, 0.5, 0.9)] for i in range(12)} | {"0": [(1.0, 0.5, 0.9)]})
    text = result.quality_yaml(0.0)
    assert len(text.splitlines()) == 5 + 13  # comment, criterion, class_path, init_args, quality, 13 layers
    quality = yaml.safe_load(text)["criterion"]["init_args"]["quality"]
    assert quality == {**{f"features.{i}": 1.0 for i in range(12)}, "0": 1.0}


@pytest.mark.parametrize("tolerance", [-0.01, math.nan, "0.1", True])
def test_bad_tolerance_is_refused(tolerance):
    with pytest.raises(ValueError, match=r"`tolerance` must be a number >= 0.*got " + repr(tolerance)[:4]):
        make_result({"fc": [(1.0, 0.5, 0.9)]}).choose(tolerance)
