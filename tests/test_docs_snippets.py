"""Every ```python block of the README and docs/*.md runs, and every ```yaml block parses, so none rots.

Each block runs on its own, in a temporary working directory, in a namespace holding every name of
``lightning_prune``, ``torch``, ``pl`` (``lightning.pytorch``) and its page's context: what the page's
text calls "your model" and "your datamodule" (``model``, ``dm``, ...), built from tiny models and
random data by ``CONTEXTS`` below. A block that cannot run on a CPU in seconds is marked on the line
before it, with the reason, and reported as skipped::

    <!-- snippet: skip (needs a CUDA GPU) -->

In a ```yaml block, each ``PruneRetrainCallback`` entry (``class_path`` and ``init_args``, as under
``trainer.callbacks`` of a ``LightningCLI`` config) is parsed and instantiated as the CLI would.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import yaml
from jsonargparse import ArgumentParser
from torch.utils.data import DataLoader, TensorDataset
from toy_models import RandomImages, ToyConvNet, image_loader

import lightning_prune
from lightning_prune.core.criteria import base as criteria_base
from lightning_prune.zoo import LeNet300100

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])

_FENCE = re.compile(r"^```python[ \t]*$")
_YAML_FENCE = re.compile(r"^```yaml[ \t]*$")
_SKIP = re.compile(r"^<!-- snippet: skip \((?P<reason>[^)]+)\) -->$")
_MARKER = re.compile(r"<!-- snippet:")


@dataclass
class Snippet:
    """One fenced block: its first line's number in the page, its code, and why it is skipped (None: it runs)."""

    line: int
    code: str
    skip: str | None


def snippets(text: str, fence: re.Pattern[str] = _FENCE) -> list[Snippet]:
    """The blocks of a page (```python by default), each with the reason of the skip marker before it."""
    lines = text.splitlines()
    found = []
    i = 0
    while i < len(lines):
        if fence.match(lines[i]):
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            marker = _SKIP.match(lines[i - 1]) if i else None
            found.append(Snippet(i + 2, "\n".join(lines[i + 1 : end]), marker.group("reason") if marker else None))
            i = end
        i += 1
    return found


class ImagesWithTest(RandomImages):
    """Random MNIST-shaped images with a test split, few enough that an epoch takes milliseconds."""

    def __init__(self):
        super().__init__(n=32, batch_size=16)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x[:16], self.y[:16]), batch_size=self.batch_size)


class ConvNetData(pl.LightningDataModule):
    """``image_loader``'s random data, what ``ToyConvNet`` trains on, as a datamodule."""

    def train_dataloader(self) -> DataLoader:
        return image_loader()


def _lenet300() -> dict[str, Any]:
    """README, sensitivity.md: the paper's LeNet-300-100 (untrained) and random MNIST-shaped data."""
    return {"model": LeNet300100(), "dm": ImagesWithTest()}


def _pruned_lenet300() -> dict[str, Any]:
    """export.md: a LeNet-300-100 after a fit that pruned it with the callback, and the callback's masks."""
    context = _lenet300()
    callback = lightning_prune.PruneRetrainCallback(rounds=[{"level": 1.5, "epochs": 1}], verbose=False)
    trainer = pl.Trainer(
        max_epochs=2,
        callbacks=[callback],
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(context["model"], datamodule=context["dm"])
    return {**context, "callback": callback, "masks": callback.pruner.masks, "LeNet300100": LeNet300100}


def _conv_net() -> dict[str, Any]:
    """usage.md: a model with ``features`` and ``classifier`` blocks, its data and optimizer, a levels file."""
    model = ToyConvNet()
    quality = Path("sensitivity/quality.yaml")  # as `lightning-prune sensitivity` writes it
    quality.parent.mkdir()
    quality.write_text("criterion: std\nquality: {features.0: 0.5, features.3: 0.8, classifier.1: 1.2}\n")
    return {
        "model": model,
        "dm": ConvNetData(),
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.05),
    }


CONTEXTS: dict[str, Callable[[], dict[str, Any]]] = {
    "README.md": _lenet300,
    "export.md": _pruned_lenet300,
    "sensitivity.md": _lenet300,
    "usage.md": _conv_net,
}


def _all_snippets(fence: re.Pattern[str] = _FENCE) -> list[Any]:
    return [
        pytest.param(page, snippet, id=f"{page.name}:{snippet.line}")
        for page in PAGES
        for snippet in snippets(page.read_text(encoding="utf-8"), fence)
    ]


def _callback_entries(node: Any) -> list[dict[str, Any]]:
    if isinstance(node, dict):
        if node.get("class_path") == "lightning_prune.PruneRetrainCallback":
            return [node]
        node = list(node.values())
    if isinstance(node, list):
        return [entry for item in node for entry in _callback_entries(item)]
    return []


@pytest.mark.parametrize(("page", "snippet"), _all_snippets())
def test_snippet_runs(page, snippet, tmp_path, monkeypatch):
    if snippet.skip is not None:
        pytest.skip(snippet.skip)
    monkeypatch.chdir(tmp_path)
    # A block may register a criterion of its own: the registry is restored after it.
    monkeypatch.setattr(criteria_base, "_REGISTRY", dict(criteria_base._REGISTRY))
    torch.manual_seed(0)
    namespace: dict[str, Any] = {"__name__": f"snippet_{page.stem}", "torch": torch, "pl": pl}
    exec("from lightning_prune import *", namespace)
    namespace.update(CONTEXTS.get(page.name, dict)())
    # Padded so that a traceback's line numbers are the page's.
    exec(compile("\n" * (snippet.line - 1) + snippet.code, str(page), "exec"), namespace)


@pytest.mark.parametrize(("page", "snippet"), _all_snippets(_YAML_FENCE))
def test_yaml_snippet_parses(page, snippet):
    config = yaml.safe_load(snippet.code)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--callback", type=lightning_prune.PruneRetrainCallback)
    # `instantiate` replaces `instantiate_classes` from jsonargparse 4.49.
    instantiate = getattr(parser, "instantiate", parser.instantiate_classes)
    for entry in _callback_entries(config):
        callback = instantiate(parser.parse_object({"callback": entry})).callback
        assert isinstance(callback, lightning_prune.PruneRetrainCallback)


def test_skip_markers_name_a_reason_and_precede_a_snippet():
    problems = []
    for page in PAGES:
        lines = page.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, start=1):
            if not _MARKER.search(line):
                continue
            if not _SKIP.match(line):
                problems.append(f"{page.name}:{number}: write the marker as `<!-- snippet: skip (reason) -->`")
            elif number == len(lines) or not _FENCE.match(lines[number]):
                problems.append(f"{page.name}:{number}: the marker must be the line right before a ```python block")
    assert not problems, "\n".join(problems)
