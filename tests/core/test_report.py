import dataclasses
import json

import pytest

from lightning_prune.core.report import LayerStats, format_table


def test_remaining_pct():
    assert LayerStats("fc.weight", (10, 10), 100, 8).remaining_pct == 8.0
    assert LayerStats("fc.weight", (3,), 3, 1).remaining_pct == pytest.approx(100 / 3)
    assert LayerStats("fc.weight", (3,), 3, 3).remaining_pct == 100.0
    assert LayerStats("fc.weight", (3,), 3, 0).remaining_pct == 0.0


def test_remaining_pct_of_empty_parameter_is_zero():
    assert LayerStats("empty", (0, 4), 0, 0).remaining_pct == 0.0


def test_defaults():
    s = LayerStats("fc.weight", (2, 2), 4, 4)
    assert s.threshold is None
    assert s.rule == ""


def test_layer_stats_is_frozen():
    s = LayerStats("fc.weight", (2, 2), 4, 4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.remaining = 1  # type: ignore[misc]


def test_as_dict_plain_json_values():
    s = LayerStats("conv.weight", (4, 3, 3, 3), 108, 27, 0.125, "1.20 x std")
    d = s.as_dict()
    assert d == {
        "name": "conv.weight",
        "shape": [4, 3, 3, 3],
        "weights": 108,
        "remaining": 27,
        "threshold": 0.125,
        "rule": "1.20 x std",
        "remaining_pct": 25.0,
    }
    assert json.loads(json.dumps(d)) == d


def test_as_dict_never_pruned():
    d = LayerStats("fc.bias", (5,), 5, 5).as_dict()
    assert d["threshold"] is None and d["rule"] == "" and d["remaining_pct"] == 100.0 and d["shape"] == [5]


def test_format_table_docstring_example():
    table = format_table([LayerStats("fc.weight", (10, 10), 100, 8, 0.05, "1.00 x std")])
    assert table == "\n".join(
        [
            "layer      shape    weights  remaining  remaining %  threshold  rule",
            "---------  -------  -------  ---------  -----------  ---------  -----------",
            "fc.weight  10 x 10      100          8        8.00%     0.0500  1.00 x std",
            "---------  -------  -------  ---------  -----------  ---------  -----------",
            "total                   100          8        8.00%             12.5x fewer",
        ]
    )


def _cells(line: str) -> list[str]:
    return [c for c in line.split("  ") if c.strip()]


def test_format_table_total_row_and_compression_ratio():
    stats = [
        LayerStats("conv1.weight", (20, 1, 5, 5), 500, 330, 0.2, "0.60 x std"),
        LayerStats("fc1.weight", (500, 800), 400_000, 32_000, 0.05, "1.20 x std"),
        LayerStats("fc1.bias", (500,), 500, 500),
    ]
    lines = format_table(stats, title="LeNet").splitlines()
    assert lines[0] == "LeNet"
    assert len(lines) == 1 + 2 + 3 + 2
    total = lines[-1]
    assert total.startswith("total")
    # 401000 weights, 32830 remaining: 8.19%, 12.2x fewer
    assert [c.strip() for c in _cells(total)] == ["total", "401.0K", "32.8K", "8.19%", "12.2x fewer"]
    assert lines[-2] == lines[2]  # the rule line above and below the rows
    bias = next(line for line in lines if line.startswith("fc1.bias"))
    assert [c.strip() for c in _cells(bias)] == ["fc1.bias", "500", "500", "500", "100.00%", "-"]


def test_format_table_all_pruned():
    table = format_table([LayerStats("a", (2,), 2, 0, 3.0, "100.0% of layer"), LayerStats("b", (4,), 4, 0, 1.0)])
    total = table.splitlines()[-1]
    assert total.endswith("all pruned")
    assert "0.00%" in total
    assert "x fewer" not in table


def test_format_table_columns_are_aligned_without_trailing_spaces():
    stats = [
        LayerStats("features.0.weight", (64, 3, 3, 3), 1728, 1000, 0.0123, "0.50 x std"),
        LayerStats("fc.weight", (10, 64), 640, 64, 0.2, "90.0% of layer"),
    ]
    lines = format_table(stats).splitlines()
    assert all(line == line.rstrip() for line in lines)
    header, rule = lines[0], lines[1]
    # numeric columns are right-aligned: their cells end where the header's column ends
    end_weights = header.index("weights") + len("weights")
    for line in lines[2:4]:
        assert line[end_weights - 1] != " "
        assert line[end_weights] == " "
    # text columns are left-aligned: every row's name starts at column 0
    assert lines[2].startswith("features.0.weight") and lines[3].startswith("fc.weight")
    assert rule.split("  ")[0] == "-" * len("features.0.weight")


@pytest.mark.parametrize(
    ("threshold", "shown"),
    [(None, "-"), (0.05, "0.0500"), (1.23456, "1.2346"), (1.234e-05, "1.234e-05"), (0.0, "0")],
)
def test_format_table_threshold_formats(threshold, shown):
    row = format_table([LayerStats("w", (4,), 4, 2, threshold)]).splitlines()[2]
    assert _cells(row)[5].strip() == shown


@pytest.mark.parametrize(
    ("n", "shown"), [(9_999, "9999"), (10_000, "10.0K"), (123_456, "123.5K"), (2_500_000, "2.50M")]
)
def test_format_table_counts(n, shown):
    row = format_table([LayerStats("w", (n,), n, n)]).splitlines()[2]
    assert _cells(row)[2].strip() == shown
    assert _cells(row)[3].strip() == shown


def test_format_table_shape_rendering():
    row = format_table([LayerStats("w", (3, 4, 5), 60, 60)]).splitlines()[2]
    assert "3 x 4 x 5" in row
