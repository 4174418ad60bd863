"""Tiny LightningModules and data for integration tests (a few batches, a few epochs)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def toy_loader(n: int = 64, features: int = 12, classes: int = 3, batch_size: int = 16, seed: int = 0) -> DataLoader:
    """A fixed classification dataset, unshuffled so runs are reproducible."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=gen)
    y = (x[:, :classes].argmax(dim=1) + (x[:, -1] > 1).long()) % classes
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


class ToyMLP(pl.LightningModule):
    """A 12-32-16-3 MLP; ``optimizer`` picks SGD (momentum, weight decay), Adam or AdamW."""

    def __init__(
        self,
        optimizer: str = "sgd",
        lr: float = 0.05,
        manual: bool = False,
        dropout: float = 0.0,
        scheduler: bool = False,
        split_decay: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = not manual
        self.net = nn.Sequential(
            nn.Linear(12, 32),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(32, 16),
            nn.ReLU(),
            nn.Linear(16, 3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        if self.automatic_optimization:
            return loss
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return None

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        name, lr = self.hparams.optimizer, self.hparams.lr
        params = self.parameters()
        if self.hparams.split_decay:
            weights = [p for n, p in self.named_parameters() if n.endswith("weight")]
            biases = [p for n, p in self.named_parameters() if n.endswith("bias")]
            params = [{"params": weights}, {"params": biases, "weight_decay": 0.0}]
        if name == "sgd":
            optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-3)
        elif name == "adam":
            optimizer = torch.optim.Adam(params, lr=lr / 10, weight_decay=1e-3)
        elif name == "adamw":
            optimizer = torch.optim.AdamW(params, lr=lr / 10, weight_decay=1e-2)
        else:
            raise ValueError(name)
        if not self.hparams.scheduler:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)}


class ToyConvNet(pl.LightningModule):
    """Conv -> BatchNorm -> ReLU -> Conv -> Flatten -> Linear, for selection by pattern."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 8, 3), nn.ReLU())
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(8 * 4 * 4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x.view(-1, 1, 8, 8)[:, :, :, :]), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def image_loader(n: int = 32, batch_size: int = 8) -> DataLoader:
    gen = torch.Generator().manual_seed(1)
    return DataLoader(
        TensorDataset(torch.randn(n, 64, generator=gen), torch.randint(0, 3, (n,), generator=gen)),
        batch_size=batch_size,
    )


def make_trainer(tmp_path, callbacks, max_epochs: int = 4, **kwargs) -> pl.Trainer:
    """A quiet CPU trainer; extra keyword arguments go to ``Trainer``."""
    kwargs.setdefault("logger", False)
    kwargs.setdefault("enable_checkpointing", False)
    kwargs.setdefault("accelerator", "cpu")
    kwargs.setdefault("devices", 1)
    return pl.Trainer(
        default_root_dir=tmp_path,
        max_epochs=max_epochs,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


class ToyData(pl.LightningDataModule):
    """``toy_loader`` data as a datamodule (train and validation), for CLI tests."""

    def __init__(self, n: int = 64, batch_size: int = 16):
        super().__init__()
        self.n, self.batch_size = n, batch_size

    def train_dataloader(self) -> DataLoader:
        return toy_loader(n=self.n, batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return toy_loader(n=32, batch_size=self.batch_size, seed=1)


class RandomImages(pl.LightningDataModule):
    """MNIST-shaped random images with labels from a fixed rule, for the zoo's LeNets in fast tests."""

    def __init__(self, n: int = 256, batch_size: int = 64):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 1, 28, 28, generator=gen)
        self.y = (self.x[:, 0, 10:18, 10:18].mean(dim=(1, 2)) > 0).long() + 2 * (
            self.x[:, 0, :4, :4].mean(dim=(1, 2)) > 0
        )
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x[:64], self.y[:64]), batch_size=self.batch_size)


class ToyResNet(pl.LightningModule):
    """torchvision's ResNet-18 on 3x32x32 images; ``dead`` output filters of each block's first conv start at zero.

    With a fraction prune of those layers the zero filters go first: their BatchNorm channels then lose their
    input, which is what dead-unit removal must handle in train mode.
    """

    def __init__(self, dead: int = 16, classes: int = 4):
        super().__init__()
        from torchvision.models import resnet18

        self.model = resnet18(num_classes=classes)
        with torch.no_grad():
            for name in ("layer1.0.conv1", "layer2.0.conv1"):
                self.model.get_submodule(name).weight[:dead] = 0
        self.example_input_array = torch.randn(2, 3, 32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


class SmallImages(pl.LightningDataModule):
    """A few random 3x32x32 images with random labels, for the ResNet tests."""

    def __init__(self, n: int = 16, batch_size: int = 8):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, 32, 32, generator=gen)
        self.y = torch.randint(0, 4, (n,), generator=gen)
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size)


class DriftSGD(torch.optim.SGD):
    """An optimizer whose step moves every weight, zero gradient or not (like a decay toward a prior)."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(0.01)
        return loss


def token_loader(n: int = 64, length: int = 6, vocab: int = 20, batch_size: int = 16, seed: int = 0) -> DataLoader:
    """Token sequences labelled by whether their first token is below the vocabulary's middle."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (n, length), generator=gen)
    return DataLoader(TensorDataset(x, (x[:, 0] < vocab // 2).long()), batch_size=batch_size)


class ToySequence(pl.LightningModule):
    """Embedding, a transformer encoder layer, an LSTM and a weight-normed head: targets of every new kind."""

    def __init__(self, vocab: int = 20, width: int = 16, dropout: float = 0.25):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.encoder = nn.TransformerEncoderLayer(width, 2, 2 * width, dropout=dropout, batch_first=True)
        self.rnn = nn.LSTM(width, width, batch_first=True)
        self.head = nn.utils.parametrizations.weight_norm(nn.Linear(width, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(self.encoder(self.emb(x)))
        return self.head(h[:, -1])

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01, weight_decay=1e-4)
