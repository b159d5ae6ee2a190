"""Embedded text for the language-model recipe: the Python documentation that ships with the interpreter.

``pydoc_data.topics`` (part of the standard library; what ``help("assert")`` prints) holds the language
reference's topics as plain text, about 460 KB of English prose with grammar and code snippets. Nothing
is downloaded and nothing depends on the seed: the topics are read in sorted order and encoded as UTF-8
bytes (256 token ids, ``ln 256 = 5.55`` nats for a uniform guess). The text is cut into blocks of 4 KiB
and every tenth block (indices 9, 19, ...) is held out for validation: about 46 KB from all over the
documentation that training never sees.

A sample is a window of ``seq_len + 1`` bytes: the first ``seq_len`` are the input, the last ``seq_len``
the next-token targets. Training windows start every ``seq_len`` bytes (they tile the training text);
the training shuffle is seeded.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

__all__ = ["VOCAB_SIZE", "TextDataModule", "byte_windows", "doc_topics", "load_text_split"]

VOCAB_SIZE = 256  # byte-level tokens
BLOCK = 4096  # bytes per block of the train/validation split
VAL_EVERY = 10  # every tenth block is validation text


def doc_topics() -> list[tuple[str, str]]:
    """The topics of the interpreter's own documentation (``pydoc_data.topics``), sorted by name."""
    from pydoc_data.topics import topics

    return sorted(topics.items())


def load_text_split() -> tuple[Tensor, Tensor]:
    """The training and validation text as 1-D ``uint8`` tensors of UTF-8 bytes.

    The topics are joined by a blank line and the bytes cut into blocks of ``BLOCK`` (4096) bytes;
    block ``i`` is validation text when ``i % 10 == 9``, training text otherwise.
    """
    data = _encode("\n\n".join(text for _, text in doc_topics()))
    blocks = data.split(BLOCK)
    val = [b for i, b in enumerate(blocks) if i % VAL_EVERY == VAL_EVERY - 1]
    train = [b for i, b in enumerate(blocks) if i % VAL_EVERY != VAL_EVERY - 1]
    return torch.cat(train), torch.cat(val)


def _encode(text: str) -> Tensor:
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).clone()


def byte_windows(data: Tensor, seq_len: int, stride: int | None = None) -> tuple[Tensor, Tensor]:
    """Inputs and next-token targets, each ``(n, seq_len)`` ``int64``, from windows of ``seq_len + 1``
    tokens of ``data`` starting every ``stride`` tokens (default ``seq_len``).

    Args:
        data: 1-D tensor of token ids.
        seq_len: tokens per input (>= 1).
        stride: distance between window starts (>= 1).
    """
    stride = seq_len if stride is None else stride
    if seq_len < 1:
        raise ValueError(f"`seq_len` must be >= 1, got {seq_len!r}")
    if stride < 1:
        raise ValueError(f"`stride` must be >= 1, got {stride!r}")
    if data.numel() < seq_len + 1:
        raise ValueError(f"need at least seq_len + 1 = {seq_len + 1} tokens, got {data.numel()}")
    windows = data.long().unfold(0, seq_len + 1, stride)
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


class TextDataModule(pl.LightningDataModule):
    """Byte-level next-token prediction on the interpreter's documentation (:func:`load_text_split`).

    Args:
        seq_len: context length (tokens per sample).
        batch_size: training batch size.
        seed: seed of the training shuffle (the text and the split are fixed).
        num_workers: loader workers.
    """

    vocab_size = VOCAB_SIZE

    def __init__(
        self,
        seq_len: int = 128,
        batch_size: int = 32,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if seq_len < 1:
            raise ValueError(f"`seq_len` must be >= 1, got {seq_len!r}")
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size!r}")
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.train_set: Dataset[Any] | None = None
        self.val_set: Dataset[Any] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train, val = load_text_split()
        self.train_set = TensorDataset(*byte_windows(train, self.seq_len))
        self.val_set = TensorDataset(*byte_windows(val, self.seq_len))

    def train_dataloader(self) -> DataLoader[Any]:
        self.setup()
        assert self.train_set is not None  # set by setup()
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            generator=torch.Generator().manual_seed(self.seed),
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader[Any]:
        self.setup()
        assert self.val_set is not None  # set by setup()
        return DataLoader(self.val_set, batch_size=128, num_workers=self.num_workers)
