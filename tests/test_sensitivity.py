"""Sensitivity analysis of LightningModules: data sources, batches, progress bar, eval-mode models, DDP."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from registry_names import REGISTERED
from torch.utils.data import DataLoader, TensorDataset
from toy_models import ToyConvNet, ToyData, ToyMLP, image_loader, toy_loader

from lightning_prune import Fraction, Std
from lightning_prune.sensitivity import SensitivityResult, analyze, sweep, validation_batches

LEVELS = [0.5, 1.0, 2.0]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class FitOnlyData(pl.LightningDataModule):
    """Loads its validation set only in ``setup("fit")``, and records the calls."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []
        self.val = None

    def prepare_data(self):
        self.calls.append("prepare_data")

    def setup(self, stage):
        self.calls.append(f"setup:{stage}")
        if stage == "fit":
            self.val = toy_loader(n=32, seed=1)

    def val_dataloader(self):
        if self.val is None:
            raise RuntimeError("not set up")
        return self.val


def test_datamodule_validation_data_and_setup_order():
    torch.manual_seed(0)
    model = ToyMLP()
    dm = FitOnlyData()
    result = analyze(model, datamodule=dm, levels=LEVELS, progress=False)
    assert dm.calls == ["prepare_data", "setup:validate", "setup:fit"]
    expected = sweep(model, list(toy_loader(n=32, seed=1)), LEVELS)
    assert result == expected
    assert result.layers == ["net.0", "net.3", "net.5"] and result.metric_name == "accuracy"
    assert analyze(model, datamodule=ToyData(), levels=LEVELS, progress=False) == expected


def test_dataloaders_lists_and_batch_to_xy():
    torch.manual_seed(0)
    model = ToyMLP()
    a, b = toy_loader(n=32, seed=1), toy_loader(n=48, seed=2)
    both = analyze(model, dataloaders=[a, b], levels=LEVELS, progress=False)
    assert both == sweep(model, [*a, *b], LEVELS)
    x = torch.cat([xb for xb, _ in a])
    y = torch.cat([yb for _, yb in a])
    dicts = DataLoader([{"image": x[i], "label": y[i]} for i in range(32)], batch_size=16)
    by_dict = analyze(
        model, dataloaders=dicts, levels=LEVELS, progress=False, batch_to_xy=lambda d: (d["image"], d["label"])
    )
    assert by_dict == analyze(model, dataloaders=a, levels=LEVELS, progress=False)
    with pytest.raises(TypeError, match=r"A validation batch is a dict.*pass `batch_to_xy`"):
        analyze(model, dataloaders=dicts, levels=LEVELS, progress=False)


def test_missing_or_double_data_source_and_bad_arguments_are_refused():
    model = ToyMLP()
    with pytest.raises(ValueError, match=r"pass `datamodule`.*or `dataloaders`.*ToyMLP\.val_dataloader"):
        analyze(model, progress=False)
    with pytest.raises(ValueError, match="either `datamodule` or `dataloaders` to the sensitivity analysis, not both"):
        analyze(model, datamodule=ToyData(), dataloaders=toy_loader(), progress=False)
    with pytest.raises(ValueError, match=r"prunes one layer at a time; criterion Global\(amount=None\) has one level"):
        analyze(model, dataloaders=toy_loader(), criterion="global", progress=False)
    with pytest.raises(ValueError, match=r"`criterion` must be a registered name " + REGISTERED):
        analyze(model, dataloaders=toy_loader(), criterion="l1", progress=False)
    with pytest.raises(ValueError, match=r"strictly increasing, got 0.5 after 1.0"):
        analyze(model, dataloaders=toy_loader(), levels=[1.0, 0.5], progress=False)
    with pytest.raises(ValueError, match="Pattern 'conv\\*' in `layers` matches no module"):
        analyze(model, dataloaders=toy_loader(), layers=["conv*"], progress=False)
    assert len(validation_batches(dataloaders={"a": toy_loader(), "b": toy_loader()})) == 2


def test_criterion_objects_and_names_sweep_alike():
    torch.manual_seed(0)
    model = ToyMLP()
    by_name = analyze(model, dataloaders=toy_loader(), levels=[0.2, 0.6], criterion="fraction", progress=False)
    by_object = analyze(model, dataloaders=toy_loader(), levels=[0.2, 0.6], criterion=Fraction(), progress=False)
    assert by_name == by_object and by_name.criterion == "fraction"
    assert analyze(model, dataloaders=toy_loader(), levels=LEVELS, criterion=Std(std_of="dense"), progress=False) == (
        analyze(model, dataloaders=toy_loader(), levels=LEVELS, progress=False)
    )


def test_progress_bar_counts_layers_times_levels(capsys):
    analyze(ToyMLP(), dataloaders=toy_loader(), levels=LEVELS, progress=True)
    err = capsys.readouterr().err
    assert "sensitivity" in err and "9/9" in err
    analyze(ToyMLP(), dataloaders=toy_loader(), levels=LEVELS, progress=False)
    assert capsys.readouterr().err == ""


def test_batchnorm_and_dropout_model_in_train_mode_is_left_untouched():
    torch.manual_seed(0)
    model = ToyConvNet()
    model.features[1].running_var.uniform_(0.5, 2.0)
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    loader = DataLoader(
        TensorDataset(*(t.view(-1, 1, 8, 8) if t.dim() == 2 else t for t in image_loader().dataset.tensors)),
        batch_size=8,
    )
    result = analyze(model, dataloaders=loader, levels=LEVELS, progress=False)
    assert all(m.training for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert result.layers == ["features.0", "features.3", "classifier.1"]
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in loader)
    assert result.baseline == correct / 32


def _ddp_worker(rank: int, world: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = ToyMLP()
        calls = []

        def accuracy(outputs, targets):  # counts its calls
            calls.append(1)
            return (outputs.argmax(1) == targets).float().mean()

        loader = toy_loader(n=64, seed=1)  # 4 batches
        result = analyze(model, dataloaders=loader, levels=LEVELS, metric=accuracy, progress=False)
        out = {"result": result.to_dict(), "calls": len(calls)}
        Path(folder, f"rank{rank}.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


def test_ddp_shares_the_layers_out_and_every_rank_gets_the_whole_result(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    torch.manual_seed(0)
    model = ToyMLP()
    single = analyze(model, dataloaders=toy_loader(n=64, seed=1), levels=LEVELS, progress=False)
    for out in ranks:
        assert SensitivityResult.from_dict(out["result"]) == single
    # 4 batches; rank 0: baseline + layers net.0 and net.5 (2 x 3 levels); rank 1: net.3 only.
    assert [out["calls"] for out in ranks] == [4 * (1 + 6), 4 * 3]
