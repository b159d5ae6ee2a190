"""A C-backed CRC-32C for TensorBoard's event writer, when a C CRC-32C package is installed (no Lightning).

Every record of a TensorBoard event file carries two masked CRC-32C checksums (of its length and of its
data). TensorBoard's own writer (``tensorboard.summary.writer.record_writer``, used by
``torch.utils.tensorboard.SummaryWriter`` and so by Lightning's ``TensorBoardLogger``) computes them
with a table-driven loop in pure Python, about 0.3 us a byte on a 2-core CPU: writing the 124 weight and
gradient histograms of resnet18 takes 80 ms with it and 14 ms with a C CRC
(``benchmarks/histogram_speed.py``). tensorboardX uses the C ``crc32c`` package when it is installed;
:func:`install_fast_crc` gives TensorBoard's writer the same:

* if ``google-crc32c`` (its C extension) or ``crc32c`` is importable (``pip install
  "stability-callbacks[fast]"``), the record writer's ``masked_crc32c`` is replaced by
  :func:`fast_masked_crc32c`, the same checksum computed in C. The bytes on disk are the same, and
  TensorBoard's reader, which keeps its own pure-Python check, reads the files as before;
* otherwise nothing changes.

It touches one name, in one module of TensorBoard, once per process (later calls are no-ops), and
:class:`~stability_callbacks.HistogramLogger` calls it at setup.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

__all__ = ["c_crc32c", "fast_masked_crc32c", "install_fast_crc", "masked_crc"]

_MASK = 0xFFFFFFFF
_MASK_DELTA = 0xA282EAD8


def masked_crc(crc: int) -> int:
    """TensorFlow's mask of a CRC-32C value: rotated right by 15 bits, plus a constant (mod 2**32).

    A record holding its own checksum would otherwise make CRC-of-CRC collisions likely; TFRecord and
    TensorBoard event files store the masked value.
    """
    return ((((crc >> 15) | (crc << 17)) & _MASK) + _MASK_DELTA) & _MASK


def _find_c_crc32c() -> Callable[[bytes], int] | None:
    """The CRC-32C function of an installed C package, or ``None`` (a pure-Python fallback is not used:
    it would be no faster than TensorBoard's own)."""
    try:
        google_crc32c = importlib.import_module("google_crc32c")
    except ImportError:
        pass
    else:
        if getattr(google_crc32c, "implementation", None) == "c":
            value: Callable[[bytes], int] = google_crc32c.value
            return value
    try:
        crc32c = importlib.import_module("crc32c")
    except ImportError:
        return None
    fn: Callable[[bytes], int] | None = getattr(crc32c, "crc32c", None)
    return fn


c_crc32c: Callable[[bytes], int] | None = _find_c_crc32c()
"""The C CRC-32C function in use (``google_crc32c.value`` or ``crc32c.crc32c``), or ``None``."""


def fast_masked_crc32c(data: bytes) -> int:
    """The masked CRC-32C of ``data``, computed in C: equal to TensorBoard's ``masked_crc32c(data)``.

    Raises:
        RuntimeError: no C CRC-32C package is installed.
    """
    if c_crc32c is None:
        raise RuntimeError(
            "no C CRC-32C package is installed; pip install google-crc32c (or 'stability-callbacks[fast]')"
        )
    return masked_crc(c_crc32c(data))


def install_fast_crc() -> bool:
    """Make TensorBoard's event writer compute its record checksums with the C CRC-32C, if installed.

    Idempotent: later calls change nothing. Returns whether the writer now uses the C checksum
    (``False`` when no C package is importable, or TensorBoard's writer is missing or different).
    """
    if c_crc32c is None:
        return False
    try:
        record_writer = importlib.import_module("tensorboard.summary.writer.record_writer")
    except ImportError:
        return False
    current = getattr(record_writer, "masked_crc32c", None)
    if current is None:  # a TensorBoard whose writer computes its checksums some other way
        return False
    if current is not fast_masked_crc32c:
        setattr(record_writer, "masked_crc32c", fast_masked_crc32c)  # noqa: B010 (typed module for mypy)
    return True
