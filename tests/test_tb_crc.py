"""The C CRC-32C for TensorBoard's event writer: the same checksums, the same bytes on disk, and a
working fallback without the C package."""

from __future__ import annotations

import importlib
import random
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import MLPModule, make_loader, make_trainer
from lightning.pytorch.loggers import TensorBoardLogger
from tb_events import histograms, load_events, scalars
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.compat.tensorflow_stub import pywrap_tensorflow
from tensorboard.summary.writer import record_writer

from stability_callbacks import HistogramLogger, tb_crc
from stability_callbacks.histogram_math import tensor_histograms

PURE_PYTHON = pywrap_tensorflow.masked_crc32c  # TensorBoard's own, table-driven in Python


def _backends() -> list[str]:
    return [name for name in ("google_crc32c", "crc32c") if importlib.util.find_spec(name) is not None]


needs_c_crc = pytest.mark.skipif(tb_crc.c_crc32c is None, reason="no C CRC-32C package installed")


def _payloads() -> list[bytes]:
    rng = random.Random(0)
    sizes = list(range(65)) + [rng.randrange(0, 10_001) for _ in range(200)] + [10_000]
    return [rng.randbytes(n) for n in sizes] + [b"\x00" * 4096, b"\xff" * 4097]


def test_masked_crc_of_the_standard_check_value() -> None:
    # CRC-32C("123456789") = 0xE3069283 (RFC 3720, appendix B.4); masked as TensorBoard does it.
    assert pywrap_tensorflow.crc32c(b"123456789") == 0xE3069283
    assert tb_crc.masked_crc(0xE3069283) == PURE_PYTHON(b"123456789")
    assert tb_crc.masked_crc(0) == 0xA282EAD8


@pytest.mark.parametrize("backend", _backends() or ["none"])
def test_c_masked_crc_equals_tensorboards_for_random_payloads(backend: str) -> None:
    if backend == "none":
        pytest.skip("no C CRC-32C package installed")
    module = importlib.import_module(backend)
    if backend == "google_crc32c" and module.implementation != "c":
        pytest.skip("google_crc32c without its C extension")
    crc = module.value if backend == "google_crc32c" else module.crc32c
    payloads = _payloads()
    mismatches = [len(p) for p in payloads if tb_crc.masked_crc(crc(p)) != PURE_PYTHON(p)]
    assert mismatches == []
    if crc is tb_crc.c_crc32c:
        assert [tb_crc.fast_masked_crc32c(p) for p in payloads] == [PURE_PYTHON(p) for p in payloads]


def _events() -> list[bytes]:
    """Serialised events with fixed wall times: histograms of a few tensors, scalars and a file version."""
    torch.manual_seed(0)
    tensors = [torch.randn(n) * s for n, s in ((10, 1.0), (1000, 1e-3), (5000, 50.0))]
    out = [event_pb2.Event(wall_time=1.0, file_version="brain.Event:2").SerializeToString()]
    for step in range(3):
        for i, h in enumerate(tensor_histograms(tensors, bins=16)):
            assert h is not None
            proto = summary_pb2.HistogramProto(
                min=h.min,
                max=h.max,
                num=h.num,
                sum=h.sum,
                sum_squares=h.sum_squares,
                bucket_limit=list(h.bucket_limits),
                bucket=list(h.bucket_counts),
            )
            summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=f"grads/t{i}", histo=proto)])
            out.append(event_pb2.Event(wall_time=2.0 + step, step=step, summary=summary).SerializeToString())
        loss = summary_pb2.Summary(
            value=[summary_pb2.Summary.Value(tag="loss", simple_value=0.5 / (step + 1))]
        )
        out.append(event_pb2.Event(wall_time=2.5 + step, step=step, summary=loss).SerializeToString())
    return out


def _write(path: Path, events: list[bytes]) -> bytes:
    """Write ``events`` with TensorBoard's own ``RecordWriter`` (whatever checksum it uses now)."""
    writer = record_writer.RecordWriter(path.open("wb"))
    for e in events:
        writer.write(e)
    writer.close()
    return path.read_bytes()


def _read(path: Path) -> tuple[dict[str, dict[int, tuple]], dict[int, float]]:
    acc = load_events(str(path))
    hists = {
        tag: {s: (h.min, h.max, h.num, h.sum, tuple(h.bucket_limit), tuple(h.bucket)) for s, h in v.items()}
        for tag in acc.Tags()["histograms"]
        if (v := histograms(acc, tag))
    }
    return hists, scalars(acc, "loss") if "loss" in acc.Tags()["scalars"] else {}


@needs_c_crc
def test_event_files_written_either_way_are_identical_and_read_back_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(record_writer, "masked_crc32c", PURE_PYTHON)
    events = _events()
    (tmp_path / "py").mkdir()
    (tmp_path / "c").mkdir()
    slow = _write(tmp_path / "py" / "events.out.tfevents.1.py", events)
    assert tb_crc.install_fast_crc() is True
    assert record_writer.masked_crc32c is tb_crc.fast_masked_crc32c
    fast = _write(tmp_path / "c" / "events.out.tfevents.1.c", events)
    assert fast == slow and len(fast) == sum(len(e) + 16 for e in events)

    hists_py, loss_py = _read(tmp_path / "py")
    hists_c, loss_c = _read(tmp_path / "c")
    assert sorted(hists_c) == ["grads/t0", "grads/t1", "grads/t2"]
    assert all(sorted(v) == [0, 1, 2] for v in hists_c.values())
    assert loss_c == pytest.approx({0: 0.5, 1: 0.25, 2: 0.5 / 3})
    assert (hists_c, loss_c) == (hists_py, loss_py)


def test_the_reader_checks_the_checksums(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # What makes the round trip above a test of the checksums: a wrong data CRC ends the read there.
    monkeypatch.setattr(record_writer, "masked_crc32c", PURE_PYTHON)
    events = _events()
    data = bytearray(_write(tmp_path / "events.out.tfevents.1.ok", events))
    (tmp_path / "events.out.tfevents.1.ok").unlink()
    first_hist_end = len(events[0]) + 16 + len(events[1]) + 16
    data[first_hist_end - 1] ^= 0x01  # the data CRC of the first histogram record
    (tmp_path / "events.out.tfevents.2.bad").write_bytes(bytes(data))
    hists, loss = _read(tmp_path)
    assert hists == {} and loss == {}


@needs_c_crc
def test_install_is_idempotent_and_histogram_logger_installs_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(record_writer, "masked_crc32c", PURE_PYTHON)
    torch.manual_seed(0)
    logger = TensorBoardLogger(str(tmp_path), name="", version="run")
    trainer = make_trainer(
        tmp_path,
        max_steps=4,
        log_every_n_steps=1,
        logger=logger,
        callbacks=[HistogramLogger(every_n_steps=2)],
    )
    trainer.fit(MLPModule(), make_loader())
    assert record_writer.masked_crc32c is tb_crc.fast_masked_crc32c
    assert tb_crc.install_fast_crc() is True and tb_crc.install_fast_crc() is True
    assert record_writer.masked_crc32c is tb_crc.fast_masked_crc32c
    acc = load_events(str(tmp_path / "run"))
    assert sorted(histograms(acc, "grads/net.0.weight")) == [1, 3]


def _hide_c_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("google_crc32c", "crc32c"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError


def test_without_a_c_package_nothing_changes_and_histograms_are_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _hide_c_packages(monkeypatch)
    assert tb_crc._find_c_crc32c() is None
    monkeypatch.setattr(tb_crc, "c_crc32c", None)
    monkeypatch.setattr(record_writer, "masked_crc32c", PURE_PYTHON)
    assert tb_crc.install_fast_crc() is False
    assert record_writer.masked_crc32c is PURE_PYTHON
    with pytest.raises(RuntimeError, match="google-crc32c"):
        tb_crc.fast_masked_crc32c(b"x")

    torch.manual_seed(0)
    logger = TensorBoardLogger(str(tmp_path), name="", version="run")
    trainer = make_trainer(
        tmp_path,
        max_steps=4,
        log_every_n_steps=1,
        logger=logger,
        callbacks=[HistogramLogger(every_n_steps=2)],
    )
    trainer.fit(MLPModule(), make_loader())
    assert record_writer.masked_crc32c is PURE_PYTHON
    acc = load_events(str(tmp_path / "run"))
    assert sorted(histograms(acc, "grads/net.0.weight")) == [1, 3]


def test_google_crc32c_without_its_c_extension_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    _hide_c_packages(monkeypatch)
    fallback = types.ModuleType("google_crc32c")
    fallback.implementation = "python"  # type: ignore[attr-defined]
    fallback.value = lambda data: 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "google_crc32c", fallback)
    assert tb_crc._find_c_crc32c() is None
    other = types.ModuleType("crc32c")
    other.crc32c = pywrap_tensorflow.crc32c  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "crc32c", other)
    assert tb_crc._find_c_crc32c() is pywrap_tensorflow.crc32c
