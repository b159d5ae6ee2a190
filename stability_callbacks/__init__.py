"""Lightning callbacks that find and fix vanishing, exploding and non-finite gradients."""

from stability_callbacks.monitor import Diagnosis, GradientDiagnostician, GradientMonitor
from stability_callbacks.stats import (
    LayerIndex,
    TensorStats,
    gradient_norms,
    layer_norms,
    nonfinite_counts,
    tensor_norms,
    tensor_stats,
    total_norm,
)

__all__ = [
    "Diagnosis",
    "GradientDiagnostician",
    "GradientMonitor",
    "LayerIndex",
    "TensorStats",
    "gradient_norms",
    "layer_norms",
    "nonfinite_counts",
    "tensor_norms",
    "tensor_stats",
    "total_norm",
]

__version__ = "0.1.0"
