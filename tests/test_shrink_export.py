"""Dead-unit removal at the end of fit (callback option) and the ``export`` subcommand."""

from __future__ import annotations

import collections
import random

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from toy_models import RandomImages, SmallImages, ToyConvNet, ToyMLP, ToyResNet, image_loader, make_trainer, toy_loader

from lightning_prune import Fraction, PruneRetrainCallback, PruneTrainer, Std
from lightning_prune.checkpoint import CheckpointError
from lightning_prune.cli import PruneCLI
from lightning_prune.core import load_shrunk, load_sparse, shapes
from lightning_prune.zoo import LeNet300100

HEAVY_AMOUNT = {"fc1": 0.5, "fc2": 0.99, "fc3": 0.5}
HEAVY = {"criterion": Fraction(amount=HEAVY_AMOUNT)}
HEAVY_YAML = {"criterion": {"class_path": "lightning_prune.Fraction", "init_args": {"amount": HEAVY_AMOUNT}}}


class OutputsBeforeShrink(Callback):
    def on_train_end(self, trainer, pl_module):
        pl_module.eval()
        with torch.no_grad():
            self.outputs = pl_module(self.inputs)
        pl_module.train()


def test_shrink_at_end_removes_dead_units_with_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    model = LeNet300100()
    record = OutputsBeforeShrink()
    record.inputs = torch.randn(32, 1, 28, 28)
    prune = PruneRetrainCallback(**HEAVY, prune_epochs=[1], shrink_at_end=True, verbose=False)
    make_trainer(tmp_path, [record, prune], max_epochs=2).fit(model, datamodule=RandomImages())
    report = prune.structure_report
    assert report is not None and report.removed_units
    assert model.fc1.out_features < 300 and model.fc2.in_features == model.fc1.out_features
    assert report.parameters_after < report.parameters_before
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(record.inputs), record.outputs, atol=1e-5, rtol=1e-5)
    for name, keep in prune.pruner.masks.items():
        assert keep.shape == model.get_parameter(name).shape


RESNET_PRUNE = {"layers": ["model.layer1.0.conv1", "model.layer2.0.conv1"], "prune_epochs": [0]}
RESNET_YAML = {**RESNET_PRUNE, "criterion": {"class_path": "lightning_prune.Fraction", "init_args": {"amount": 0.3}}}
RESNET_PRUNE["criterion"] = Fraction(amount=0.3)


class ConvBNNet(ToyConvNet):
    def __init__(self):
        super().__init__()
        self.example_input_array = torch.randn(2, 1, 8, 8)
        with torch.no_grad():
            self.features[0].weight[1] = 0  # its BatchNorm channel loses its input at the prune

    def forward(self, x):
        return super().forward(x.view(-1, 1, 8, 8))


@pytest.mark.parametrize("net", ["conv-bn", "resnet18"])
def test_shrink_at_end_on_batchnorm_nets_in_train_mode(tmp_path, net):
    torch.manual_seed(0)
    record = OutputsBeforeShrink()
    if net == "resnet18":
        model, data, kwargs = ToyResNet(), SmallImages(), RESNET_PRUNE
        record.inputs = torch.randn(4, 3, 32, 32)
    else:
        model, data, kwargs = (
            ConvBNNet(),
            None,
            {"layers": ["features.0"], "criterion": Std(quality=0.0), "prune_epochs": [0]},
        )
        record.inputs = torch.randn(4, 1, 8, 8)
    prune = PruneRetrainCallback(**kwargs, shrink_at_end=True, verbose=False)
    trainer = make_trainer(tmp_path, [record, prune], max_epochs=1, limit_train_batches=2)
    trainer.fit(model, datamodule=data) if data is not None else trainer.fit(model, image_loader())
    first = "model.layer1.0.conv1" if net == "resnet18" else "features.0"
    assert prune.structure_report is not None and prune.structure_report.removed_units.get(first, 0) >= 1
    assert model.training  # fit leaves it in train mode, and the shrink does not change that
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(record.inputs), record.outputs, atol=1e-4, rtol=1e-4)


def test_export_subcommand_shrinks_a_resnet18_checkpoint(tmp_path):
    config = {
        "model": {"class_path": "toy_models.ToyResNet"},
        "data": {"class_path": "toy_models.SmallImages"},
        "trainer": {
            "max_epochs": 1,
            "default_root_dir": str(tmp_path),
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "accelerator": "cpu",
            "callbacks": [{"class_path": "lightning_prune.PruneRetrainCallback", "init_args": RESNET_YAML}],
        },
    }
    path = tmp_path / "resnet.yaml"
    path.write_text(yaml.safe_dump(config))
    torch.manual_seed(0)
    PruneCLI(args=["fit", "--config", str(path)])
    (checkpoint,) = tmp_path.glob("**/*.ckpt")
    shrunk = tmp_path / "resnet.shrunk.safetensors"
    args = ["export", "--config", str(path), f"--checkpoint={checkpoint}", "--shrink=true"]
    PruneCLI(args=[*args, f"--output={tmp_path / 'resnet.sparse.safetensors'}", f"--shrunk_output={shrunk}"])
    fresh = ToyResNet()
    load_shrunk(fresh, shrunk)
    assert shapes(fresh)["model.layer1.0.conv1"][0] < 64


def test_shrink_at_end_needs_an_example_input(tmp_path):
    trainer = make_trainer(tmp_path, [PruneRetrainCallback(prune_epochs=[1], shrink_at_end=True)], max_epochs=2)
    with pytest.raises(ValueError, match="`shrink_at_end=True` needs `example_input_array`"):
        trainer.fit(ToyMLP(), toy_loader())


def test_export_subcommand_writes_a_compact_file_and_a_shrunk_model(tmp_path):
    config = {
        "model": {"class_path": "lightning_prune.zoo.LeNet300100"},
        "data": {"class_path": "toy_models.RandomImages"},
        "trainer": {
            "max_epochs": 2,
            "default_root_dir": str(tmp_path),
            "logger": False,
            "enable_progress_bar": False,
            "accelerator": "cpu",
            "callbacks": [
                {
                    "class_path": "lightning_prune.PruneRetrainCallback",
                    "init_args": {**HEAVY_YAML, "prune_epochs": [1]},
                }
            ],
        },
    }
    path = tmp_path / "lenet.yaml"  # not config.yaml: the fit's SaveConfigCallback writes that one
    path.write_text(yaml.safe_dump(config))
    PruneCLI(args=["fit", "--config", str(path)])
    (checkpoint,) = tmp_path.glob("**/*.ckpt")
    output, shrunk = tmp_path / "lenet.sparse.safetensors", tmp_path / "lenet.shrunk.safetensors"
    args = ["export", "--config", str(path), f"--checkpoint={checkpoint}", f"--output={output}", "--shrink=true"]
    PruneCLI(args=[*args, f"--shrunk_output={shrunk}"])
    state, masks = load_sparse(output)
    fresh = LeNet300100()
    load_shrunk(fresh, shrunk)
    assert shapes(fresh)["fc1"][0] < 300
    for name, value in fresh.state_dict().items():
        assert torch.equal(state[name], value), name
    assert set(masks) == {"fc1.weight", "fc2.weight", "fc3.weight"}
    kept = sum(int(m.sum()) * 4 for m in masks.values())
    dense_rest = sum(v.numel() * 4 for k, v in state.items() if k not in masks)
    assert output.stat().st_size <= 1.16 * kept + dense_rest + 4096


def _export_outcome(trainer, checkpoint, output):
    """``"error:<type>"`` or the exported file's tensors, for a (possibly damaged) checkpoint."""
    try:
        trainer.export(ToyMLP(), str(checkpoint), str(output))
    except (CheckpointError, ValueError) as err:
        return f"error:{type(err).__name__}"
    return load_sparse(output)


def test_export_of_a_damaged_checkpoint_fails_clearly_or_exports_the_same(tmp_path):
    torch.manual_seed(0)
    prune = PruneRetrainCallback(criterion=Std(quality=0.8), prune_epochs=[1], verbose=False)
    saver = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    make_trainer(tmp_path, [prune, saver], max_epochs=2, enable_checkpointing=True).fit(ToyMLP(), toy_loader())
    data = (tmp_path / "last.ckpt").read_bytes()
    exporter = PruneTrainer(
        callbacks=[PruneRetrainCallback(criterion=Std(quality=0.8), prune_epochs=[1], verbose=False)]
    )
    reference = _export_outcome(exporter, tmp_path / "last.ckpt", tmp_path / "ref.safetensors")
    rng = random.Random(0)
    outcomes = collections.Counter()
    for i in range(240):
        damaged = bytearray(data)
        if i % 3:
            pos = rng.randrange(len(damaged))
            damaged[pos] ^= 1 << rng.randrange(8)
        else:
            damaged = damaged[: rng.randrange(len(damaged))]
        (tmp_path / "m.ckpt").write_bytes(bytes(damaged))
        got = _export_outcome(exporter, tmp_path / "m.ckpt", tmp_path / "m.safetensors")
        if isinstance(got, str):
            outcomes[got] += 1
            continue
        same = got[0].keys() == reference[0].keys() and all(torch.equal(got[0][k], reference[0][k]) for k in got[0])
        same = same and all(torch.equal(got[1][k], reference[1][k]) for k in reference[1])
        outcomes["same export" if same else "DIFFERENT export"] += 1
    assert outcomes["DIFFERENT export"] == 0, outcomes
    assert outcomes["error:CheckpointError"] > 100, outcomes


def test_a_dict_example_input_is_refused_before_training_and_by_export(tmp_path):
    model = ToyMLP()
    model.example_input_array = {"x": torch.randn(2, 8)}
    prune = PruneRetrainCallback(prune_epochs=[1], shrink_at_end=True)
    trainer = make_trainer(tmp_path, [prune], max_epochs=2)
    with pytest.raises(
        ValueError, match=r"`shrink_at_end=True` needs `example_input_array` as a tensor or a tuple.*\['x'\]"
    ):
        trainer.fit(model, toy_loader())
    with pytest.raises(ValueError, match=r"`shrink` needs `example_input_array` as a tensor or a tuple"):
        PruneTrainer(logger=False).export(model, str(tmp_path / "missing.ckpt"), shrink=True)
