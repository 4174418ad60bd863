"""Dead-unit removal at the end of fit (callback option) and the ``export`` subcommand."""

from __future__ import annotations

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from toy_models import RandomImages, ToyMLP, make_trainer, toy_loader

from lightning_prune import PruneRetrainCallback
from lightning_prune.cli import PruneCLI
from lightning_prune.core import load_shrunk, load_sparse, shapes
from lightning_prune.zoo import LeNet300100

HEAVY = {"criterion": "fraction", "amount": {"fc1": 0.5, "fc2": 0.99, "fc3": 0.5}}


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
                    "init_args": {**HEAVY, "prune_epochs": [1]},
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
