"""Data modules of the recipes: embedded digits, torchvision image sets, and synthetic sequence tasks.

- ``digits``: scikit-learn's 8x8 handwritten digits (1,797 images, shipped with scikit-learn, no
  download), as 64 flat features or 1x8x8 images, with a fixed stratified train/val split and features
  standardised with the training set's statistics.
- ``mnist``, ``fashion_mnist``, ``cifar10``: torchvision data sets read from ``data_dir``; downloaded
  only when ``download=True``. A missing data set raises ``FileNotFoundError`` naming it and the folder.
- ``adding``: the adding problem of Hochreiter & Schmidhuber (1997): a sequence of ``seq_len`` pairs
  (value in [0, 1], marker in {0, 1}) with two markers, one in each half; the target is the sum of the
  two marked values. Predicting the mean (1.0) gives an MSE of about 1/6.
- ``seq_digits``: the digits read pixel by pixel, a 64-step sequence of one feature per step.
- ``text``: byte-level next-token prediction on the interpreter's own documentation
  (:mod:`recipes.text_data`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

from recipes.text_data import TextDataModule

__all__ = [
    "DATASETS",
    "AddingDataModule",
    "DigitsDataModule",
    "SeqDigitsDataModule",
    "TorchvisionDataModule",
    "adding_problem",
    "load_digits_split",
    "make_datamodule",
    "torchvision_available",
]

DIGITS_SPLIT_SEED = 0
DIGITS_VAL_FRACTION = 0.2


def load_digits_split() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The digits as ``(x_train, y_train, x_val, y_val)``: 64 float features, standardised with the
    training set's per-feature mean and std, and a fixed stratified 80/20 split (same for every seed)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x_tr, x_va, y_tr, y_va = train_test_split(
        bunch.data,
        bunch.target,
        test_size=DIGITS_VAL_FRACTION,
        stratify=bunch.target,
        random_state=DIGITS_SPLIT_SEED,
    )
    x_train = torch.as_tensor(x_tr, dtype=torch.float32)
    x_val = torch.as_tensor(x_va, dtype=torch.float32)
    mean = x_train.mean(0)
    std = x_train.std(0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return (
        (x_train - mean) / std,
        torch.as_tensor(y_tr, dtype=torch.long),
        (x_val - mean) / std,
        torch.as_tensor(y_va, dtype=torch.long),
    )


class _TensorDataModule(pl.LightningDataModule):
    """A data module over in-memory tensors, with a seeded shuffle."""

    def __init__(self, batch_size: int, seed: int, num_workers: int = 0) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size!r}")
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.train_set: Dataset[Any] | None = None
        self.val_set: Dataset[Any] | None = None

    def build(self) -> tuple[Dataset[Any], Dataset[Any]]:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set, self.val_set = self.build()

    def train_dataloader(self) -> DataLoader[Any]:
        self.setup()
        assert self.train_set is not None  # set by setup()
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            generator=g,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader[Any]:
        self.setup()
        assert self.val_set is not None  # set by setup()
        return DataLoader(self.val_set, batch_size=512, num_workers=self.num_workers)


class DigitsDataModule(_TensorDataModule):
    """scikit-learn's handwritten digits, embedded (no download).

    Args:
        batch_size: training batch size.
        flat: 64 features per sample (``True``) or 1x8x8 images (``False``).
        seed: seed of the training shuffle (the split itself is fixed).
    """

    num_classes = 10

    def __init__(self, batch_size: int = 64, flat: bool = True, seed: int = 0, num_workers: int = 0) -> None:
        super().__init__(batch_size, seed, num_workers)
        self.flat = flat

    def build(self) -> tuple[Dataset[Any], Dataset[Any]]:
        x_tr, y_tr, x_va, y_va = load_digits_split()
        if not self.flat:
            x_tr, x_va = x_tr.view(-1, 1, 8, 8), x_va.view(-1, 1, 8, 8)
        return TensorDataset(x_tr, y_tr), TensorDataset(x_va, y_va)


class SeqDigitsDataModule(_TensorDataModule):
    """The digits read pixel by pixel: ``(64, 1)`` sequences, class label as target.

    Args:
        batch_size: training batch size.
        seed: seed of the training shuffle (the split is fixed).
    """

    num_classes = 10

    def __init__(self, batch_size: int = 64, seed: int = 0, num_workers: int = 0) -> None:
        super().__init__(batch_size, seed, num_workers)

    def build(self) -> tuple[Dataset[Any], Dataset[Any]]:
        x_tr, y_tr, x_va, y_va = load_digits_split()
        return TensorDataset(x_tr.unsqueeze(-1), y_tr), TensorDataset(x_va.unsqueeze(-1), y_va)


def adding_problem(n: int, seq_len: int, seed: int) -> tuple[Tensor, Tensor]:
    """``n`` samples of the adding problem: inputs ``(n, seq_len, 2)``, targets ``(n, 1)``.

    Channel 0 holds values drawn uniformly from [0, 1]; channel 1 marks two positions, one drawn from
    the first half of the sequence and one from the second half; the target is the sum of the two
    marked values.

    Args:
        n: number of samples.
        seq_len: sequence length T (>= 2).
        seed: seed of the generator; the same seed gives the same samples.
    """
    if seq_len < 2:
        raise ValueError(f"`seq_len` must be >= 2, got {seq_len!r}")
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(n, seq_len, generator=g)
    half = seq_len // 2
    first = torch.randint(0, half, (n,), generator=g)
    second = torch.randint(half, seq_len, (n,), generator=g)
    markers = torch.zeros(n, seq_len)
    rows = torch.arange(n)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    target = values[rows, first] + values[rows, second]
    return torch.stack([values, markers], dim=-1), target.unsqueeze(-1)


class AddingDataModule(_TensorDataModule):
    """The adding problem (Hochreiter & Schmidhuber 1997), generated with a seed.

    Args:
        seq_len: sequence length T.
        n_train, n_val: number of training and validation sequences.
        batch_size: training batch size.
        seed: seed of the training data and shuffle; the validation set uses ``seed + 1``.
    """

    def __init__(
        self,
        seq_len: int = 50,
        n_train: int = 20000,
        n_val: int = 1000,
        batch_size: int = 64,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, seed, num_workers)
        if seq_len < 2:
            raise ValueError(f"`seq_len` must be >= 2, got {seq_len!r}")
        self.seq_len = seq_len
        self.n_train = n_train
        self.n_val = n_val

    def build(self) -> tuple[Dataset[Any], Dataset[Any]]:
        x_tr, y_tr = adding_problem(self.n_train, self.seq_len, self.seed)
        x_va, y_va = adding_problem(self.n_val, self.seq_len, self.seed + 1)
        return TensorDataset(x_tr, y_tr), TensorDataset(x_va, y_va)


# torchvision data sets: class name, channels, side, mean, std
_TORCHVISION: dict[str, tuple[str, int, int, tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ("MNIST", 1, 28, (0.1307,), (0.3081,)),
    "fashion_mnist": ("FashionMNIST", 1, 28, (0.2860,), (0.3530,)),
    "cifar10": ("CIFAR10", 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


def _torchvision_dataset(name: str, data_dir: str | Path, train: bool, download: bool, transform: Any) -> Any:
    import torchvision

    cls = getattr(torchvision.datasets, _TORCHVISION[name][0])
    try:
        return cls(root=str(data_dir), train=train, download=download, transform=transform)
    except RuntimeError as err:
        raise FileNotFoundError(
            f"data set '{name}' not found under '{data_dir}'. Pass --download (download=True) to fetch it "
            f"there, or point --data-dir at a folder that holds it. ({err})"
        ) from err


def torchvision_available(name: str, data_dir: str | Path | None) -> bool:
    """Whether torchvision data set ``name`` is already present under ``data_dir`` (no download)."""
    if data_dir is None or name not in _TORCHVISION:
        return False
    try:
        _torchvision_dataset(name, data_dir, train=False, download=False, transform=None)
    except FileNotFoundError:
        return False
    return True


class TorchvisionDataModule(pl.LightningDataModule):
    """MNIST, Fashion-MNIST or CIFAR-10 from torchvision, normalised, as images or flat vectors.

    Args:
        name: ``"mnist"``, ``"fashion_mnist"`` or ``"cifar10"``.
        data_dir: folder that holds (or will hold) the data set.
        download: download when missing (off by default: a missing set is a clear error).
        flat: flatten images to vectors (for the MLP).
        batch_size: training batch size.
        seed: seed of the training shuffle.
        num_workers: loader workers.
    """

    def __init__(
        self,
        name: str = "mnist",
        data_dir: str = "data",
        download: bool = False,
        flat: bool = False,
        batch_size: int = 128,
        seed: int = 0,
        num_workers: int = 2,
    ) -> None:
        super().__init__()
        if name not in _TORCHVISION:
            raise ValueError(f"`name` must be one of {sorted(_TORCHVISION)}, got {name!r}")
        self.dataset = name
        self.data_dir = data_dir
        self.download = download
        self.flat = flat
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        _, channels, side, _, _ = _TORCHVISION[name]
        self.num_classes = 10
        self.in_channels = channels
        self.in_features = channels * side * side
        self.train_set: Any = None
        self.val_set: Any = None

    def _transform(self) -> Any:
        from torchvision import transforms

        _, _, _, mean, std = _TORCHVISION[self.dataset]
        steps: list[Any] = [transforms.ToTensor(), transforms.Normalize(mean, std)]
        if self.flat:
            steps.append(transforms.Lambda(torch.flatten))
        return transforms.Compose(steps)

    def prepare_data(self) -> None:
        if self.download:
            _torchvision_dataset(self.dataset, self.data_dir, True, True, None)
            _torchvision_dataset(self.dataset, self.data_dir, False, True, None)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            t = self._transform()
            self.train_set = _torchvision_dataset(self.dataset, self.data_dir, True, False, t)
            self.val_set = _torchvision_dataset(self.dataset, self.data_dir, False, False, t)

    def train_dataloader(self) -> DataLoader[Any]:
        self.setup()
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            generator=g,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader[Any]:
        self.setup()
        return DataLoader(self.val_set, batch_size=512, num_workers=self.num_workers)


DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "adding", "seq_digits", "text")


def make_datamodule(
    name: str,
    *,
    flat: bool = True,
    batch_size: int = 64,
    seed: int = 0,
    data_dir: str | None = None,
    download: bool = False,
    seq_len: int = 50,
) -> pl.LightningDataModule:
    """The data module called ``name`` (one of :data:`DATASETS`)."""
    if name == "digits":
        return DigitsDataModule(batch_size=batch_size, flat=flat, seed=seed)
    if name == "seq_digits":
        return SeqDigitsDataModule(batch_size=batch_size, seed=seed)
    if name == "adding":
        return AddingDataModule(seq_len=seq_len, batch_size=batch_size, seed=seed)
    if name == "text":
        return TextDataModule(seq_len=seq_len, batch_size=batch_size, seed=seed)
    if name in _TORCHVISION:
        return TorchvisionDataModule(
            name=name,
            data_dir=data_dir or "data",
            download=download,
            flat=flat,
            batch_size=batch_size,
            seed=seed,
        )
    raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
