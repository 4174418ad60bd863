"""Prune scalars, tables and figures in Lightning's loggers: CSV and TensorBoard in real fits; MLflow and W&B faked,
and in real fits where their packages are installed (a file store, an offline run)."""

from __future__ import annotations

import csv
import importlib.util
import logging
from types import SimpleNamespace

import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger
from toy_models import ToyData, ToyMLP, make_trainer

from lightning_prune import LayerStats, Logging, PruneRetrainCallback, Std
from lightning_prune.cli import PruneCLI
from lightning_prune.loggers import COLUMNS, ROUND_TABLE_FILE, LoggerOutput, weight_histogram

NAMES = [f"net.{i}.weight" for i in (0, 3, 5)]
ROUNDS = [{"level": 0.5, "epochs": 1}, {"level": 1.0, "epochs": 1}]


def fit(tmp_path, logger, **kwargs) -> PruneRetrainCallback:
    torch.manual_seed(0)
    prune = PruneRetrainCallback(rounds=ROUNDS, criterion=Std(), verbose=False, **kwargs)
    make_trainer(tmp_path, [prune], max_epochs=3, logger=logger).fit(ToyMLP(), datamodule=ToyData())
    return prune


def test_csv_logger_gets_counts_thresholds_and_the_round_table(tmp_path):
    logger = CSVLogger(tmp_path, name="logs")
    prune = fit(tmp_path, logger)
    with open(tmp_path / "logs" / "version_0" / "metrics.csv") as f:
        metrics = [row for row in csv.DictReader(f) if row["prune/remaining/net.0.weight"]]
    assert [int(row["epoch"]) for row in metrics] == [1, 2]  # one row per prune
    last = prune.pruner.stats()
    for stat in last:
        assert float(metrics[-1][f"prune/remaining/{stat.name}"]) == stat.remaining
        assert float(metrics[-1][f"prune/threshold/{stat.name}"]) == pytest.approx(stat.threshold, rel=1e-6)
        assert float(metrics[-1][f"prune/remaining_pct/{stat.name}"]) == pytest.approx(stat.remaining_pct, rel=1e-6)

    with open(tmp_path / "logs" / "version_0" / ROUND_TABLE_FILE) as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == COLUMNS
    assert [(r["round"], r["epoch"], r["name"]) for r in rows] == [
        (str(k), str(k), name) for k in (1, 2) for name in NAMES
    ]
    for row, stat in zip(rows[3:], last, strict=True):
        assert (int(row["weights"]), int(row["remaining"]), row["shape"]) == (
            stat.weights,
            stat.remaining,
            "x".join(map(str, stat.shape)),
        )
        assert float(row["threshold"]) == pytest.approx(stat.threshold) and row["rule"] == stat.rule
    assert int(rows[0]["remaining"]) > int(rows[3]["remaining"])  # round 2 prunes further


def events(log_dir) -> dict[str, list[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    return accumulator.Tags()


def test_tensorboard_gets_the_table_as_text_and_the_figures_as_images(tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("matplotlib")
    logger = TensorBoardLogger(tmp_path, name="tb")
    fit(tmp_path, logger)
    tags = events(logger.log_dir)
    assert {f"prune/remaining/{n}" for n in NAMES} | {f"prune/threshold/{n}" for n in NAMES} <= set(tags["scalars"])
    assert "prune/table/text_summary" in tags["tensors"]
    images = {f"prune/weights/{n}/{when}" for n in NAMES for when in ("before", "after")} | {"prune/remaining_share"}
    assert set(tags["images"]) == images


def test_figures_and_tables_can_be_turned_off(tmp_path):
    pytest.importorskip("tensorboard")
    logger = TensorBoardLogger(tmp_path, name="tb")
    fit(tmp_path, logger, logging={"figures": False})
    tags = events(logger.log_dir)
    assert tags["images"] == [] and "prune/table/text_summary" in tags["tensors"]
    assert "prune/remaining/net.0.weight" in tags["scalars"]

    csv_logger = CSVLogger(tmp_path, name="csv")
    fit(tmp_path, csv_logger, logging=Logging(tables=False))
    assert not (tmp_path / "csv" / "version_0" / ROUND_TABLE_FILE).exists()


def test_logging_settings_are_checked_and_read_from_yaml(tmp_path):
    with pytest.raises(ValueError, match=r"`logging.figures` must be True or False, got 'no'"):
        Logging(figures="no")
    with pytest.raises(ValueError, match="Unknown key 'images' in `logging`"):
        PruneRetrainCallback(logging={"images": False})
    callback = {"class_path": "lightning_prune.PruneRetrainCallback", "init_args": {"logging": {"figures": False}}}
    config = {
        "model": {"class_path": "toy_models.ToyMLP"},
        "data": {"class_path": "toy_models.ToyData"},
        "trainer": {"logger": False, "default_root_dir": str(tmp_path), "callbacks": [callback]},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = PruneCLI(args=["--config", str(path)], run=False)
    (prune,) = [c for c in cli.trainer.callbacks if isinstance(c, PruneRetrainCallback)]
    assert prune.logger_output.settings == Logging(tables=True, figures=False)


class Recorder:
    """Stands in for an MLflow client: records each call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: self.calls.append((name, args, kwargs))


class FakeMLflow(MLFlowLogger):
    def __init__(self) -> None:
        self.client = Recorder()

    @property
    def experiment(self) -> Recorder:
        return self.client

    @property
    def run_id(self) -> str:
        return "run-1"


class FakeWandb(WandbLogger):
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []

    def log_table(self, *args, **kwargs) -> None:
        self.calls.append(("log_table", args, kwargs))

    def log_image(self, *args, **kwargs) -> None:
        self.calls.append(("log_image", args, kwargs))


def pretend(monkeypatch, **installed: bool) -> None:
    """Make ``importlib.util.find_spec`` report the named packages as installed or not (the fakes need neither)."""
    import importlib.util

    find_spec = importlib.util.find_spec

    def spec(name, *args):
        if name in installed:
            return find_spec("json") if installed[name] else None
        return find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", spec)


STATS = [LayerStats("fc.weight", (4, 3), 12, 6, 0.1, "1.00 x std"), LayerStats("fc.bias", (4,), 4, 4)]


def test_mlflow_and_wandb_get_tables_and_figures_by_their_own_calls(monkeypatch):
    pytest.importorskip("matplotlib")
    pretend(monkeypatch, pandas=True)
    mlflow, wandb = FakeMLflow(), FakeWandb()
    trainer = SimpleNamespace(loggers=[mlflow, wandb], is_global_zero=True, global_step=7)
    LoggerOutput(Logging()).log_prune(trainer, 2, 3, STATS)
    names = [(name, args[0]) for name, args, _ in mlflow.client.calls]
    assert names == [("log_table", "run-1"), ("log_text", "run-1"), ("log_figure", "run-1")]
    table = mlflow.client.calls[0][2]
    assert table["artifact_file"] == "prune_rounds.json" and table["data"]["remaining"] == [6, 4]
    assert mlflow.client.calls[1][1][2] == "prune/table_round2.md"
    assert mlflow.client.calls[2][1][2] == "prune/remaining_share_round2.png"

    (table_call, image_call) = wandb.calls
    assert table_call[1] == ("prune/table",) and table_call[2]["columns"] == list(COLUMNS)
    assert table_call[2]["data"][1][COLUMNS.index("threshold")] is None and table_call[2]["step"] == 7
    (image,) = image_call[1][1]
    assert image_call[1][0] == "prune/remaining_share" and image.mode == "RGB" and image.size == (700, 180)


def test_no_figures_and_one_notice_without_matplotlib(monkeypatch, caplog):
    pretend(monkeypatch, matplotlib=False, pandas=True)
    mlflow = FakeMLflow()
    trainer = SimpleNamespace(loggers=[mlflow], is_global_zero=True, global_step=0)
    output = LoggerOutput(Logging())
    with caplog.at_level(logging.INFO):
        output.log_prune(trainer, 1, 0, STATS)
        output.log_prune(trainer, 2, 1, STATS)
    assert [name for name, _, _ in mlflow.client.calls] == ["log_table", "log_text"] * 2
    assert sum("matplotlib is not installed" in r.getMessage() for r in caplog.records) == 1


def test_without_pandas_mlflow_gets_the_markdown_table_and_one_notice(monkeypatch, caplog):
    pretend(monkeypatch, pandas=False)
    mlflow = FakeMLflow()
    trainer = SimpleNamespace(loggers=[mlflow], is_global_zero=True, global_step=0)
    output = LoggerOutput(Logging(figures=False))
    with caplog.at_level(logging.INFO):
        output.log_prune(trainer, 1, 0, STATS)
        output.log_prune(trainer, 2, 1, STATS)
    assert [name for name, _, _ in mlflow.client.calls] == ["log_text"] * 2
    assert sum("pandas is not installed" in r.getMessage() for r in caplog.records) == 1


def test_nothing_is_logged_off_rank_zero():
    mlflow = FakeMLflow()
    trainer = SimpleNamespace(loggers=[mlflow], is_global_zero=False, global_step=0)
    LoggerOutput(Logging()).log_prune(trainer, 1, 0, STATS)
    assert mlflow.client.calls == []


def test_weight_histogram_leaves_the_pruned_zeros_out():
    weight = torch.tensor([0.0, 0.0, -0.5, 0.25, 1.0])
    counts, edges = weight_histogram(weight)
    assert int(counts.sum()) == 5 and len(edges) == len(counts) + 1 and edges[0] == -1.0
    survivors, _ = weight_histogram(weight, survivors=True)
    assert int(survivors.sum()) == 3
    assert weight_histogram(torch.zeros(3), survivors=True) is None


# ----------------------------------------------------------------- the real packages, where installed
def test_a_fit_logs_scalars_tables_and_figures_to_a_real_mlflow_file_store(tmp_path, monkeypatch, caplog):
    pytest.importorskip("mlflow")
    pytest.importorskip("matplotlib")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 wants a database; a folder is enough here
    logger = MLFlowLogger(experiment_name="prune", tracking_uri=(tmp_path / "mlruns").as_uri())
    with caplog.at_level(logging.INFO):
        prune = fit(tmp_path, logger)
    client, run = logger.experiment, logger.run_id
    metrics = client.get_run(run).data.metrics
    for stat in prune.pruner.stats():
        assert metrics[f"prune/remaining/{stat.name}"] == stat.remaining
    artifacts = {a.path for a in client.list_artifacts(run, "prune")}
    assert {"prune/table_round1.md", "prune/table_round2.md", "prune/remaining_share_round2.png"} <= artifacts
    table = (tmp_path / "mlruns").glob(f"*/{run}/artifacts/prune/table_round2.md")
    assert "net.0.weight" in next(table).read_text()
    with_pandas = importlib.util.find_spec("pandas") is not None  # MLflow's log_table needs it
    assert ("prune_rounds.json" in {a.path for a in client.list_artifacts(run)}) == with_pandas
    assert ("pandas is not installed" in caplog.text) != with_pandas


def test_a_fit_logs_tables_and_figures_to_a_real_offline_wandb_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("matplotlib")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(project="prune", save_dir=str(tmp_path), offline=True)
    try:
        fit(tmp_path, logger)
    finally:
        logger.experiment.finish()
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    media = {path.relative_to(run / "files" / "media").parts[:2] for path in (run / "files" / "media").rglob("*.*")}
    assert ("table", "prune") in media and ("images", "prune") in media
    tables = list((run / "files" / "media" / "table" / "prune").glob("table_*.table.json"))
    assert len(tables) == 2 and '"net.0.weight"' in tables[-1].read_text()
