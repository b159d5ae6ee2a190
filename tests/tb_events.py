"""Read back what a run wrote to TensorBoard: histograms, images and scalars of one log directory."""

from __future__ import annotations

from typing import Any

from tensorboard.backend.event_processing.event_accumulator import (
    HISTOGRAMS,
    IMAGES,
    SCALARS,
    EventAccumulator,
)


def load_events(log_dir: str) -> EventAccumulator:
    """An EventAccumulator over ``log_dir`` that keeps every histogram, image and scalar."""
    acc = EventAccumulator(log_dir, size_guidance={HISTOGRAMS: 0, IMAGES: 0, SCALARS: 0})
    acc.Reload()
    return acc


def histograms(acc: EventAccumulator, tag: str) -> dict[int, Any]:
    """step -> HistogramValue (min, max, num, sum, sum_squares, bucket_limit, bucket) of one tag."""
    return {e.step: e.histogram_value for e in acc.Histograms(tag)}


def scalars(acc: EventAccumulator, tag: str) -> dict[int, float]:
    """step -> value of one scalar tag."""
    return {e.step: e.value for e in acc.Scalars(tag)}
