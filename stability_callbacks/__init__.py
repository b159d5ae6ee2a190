"""Lightning callbacks that find and fix vanishing, exploding and non-finite gradients.

Callbacks (layer 2): :class:`GradientMonitor`, :class:`AutoClip`, :class:`ZClip`, :class:`AGC`,
:class:`NormClip`, :class:`ValueClip`, :class:`NonFiniteGuard`, :class:`InitSwap`,
:class:`HistogramLogger`, :class:`ActivationMonitor`, :class:`AdaGC`, :class:`MomentReset`,
:class:`UpdateMonitor`, and :class:`StabilityAutopilot`, which composes them. The tensor math
beneath them (layer 1) works in a plain PyTorch loop too:
:func:`gradient_norms`, :func:`total_norm`, :func:`clip_grad_norm_to`, :func:`adaptive_clip_grad_`,
:func:`init_swap`, :func:`lsuv_`, :func:`tensor_histograms`...
"""

from stability_callbacks.activations import ActivationMonitor, activation_stats
from stability_callbacks.adagc import AdaGC, adagc_clip_
from stability_callbacks.autopilot import (
    LossSpikeDetector,
    RollbackLimitError,
    SnapshotRing,
    StabilityAutopilot,
)
from stability_callbacks.clipping import (
    AGC,
    AutoClip,
    NormClip,
    PercentilePolicy,
    ValueClip,
    ZClip,
    ZScorePolicy,
    adaptive_clip_grad_,
    clip_grad_norm_to,
    clip_grad_value_,
)
from stability_callbacks.guard import NonFiniteGradientError, NonFiniteGuard
from stability_callbacks.histograms import Histogram, HistogramLogger, grad_flow_image, tensor_histograms
from stability_callbacks.init import InitReport, InitSwap, init_swap, lsuv_
from stability_callbacks.moment_reset import MomentReset, reset_adam_moments_, spike_aware_clip_
from stability_callbacks.monitor import Diagnosis, GradientDiagnostician, GradientMonitor
from stability_callbacks.skip_step import OutlierStepTest, SkipDecision, StepUndo
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
from stability_callbacks.update_monitor import UpdateJumpDetector, UpdateMonitor, adam_update_norms

__all__ = [
    "AGC",
    "ActivationMonitor",
    "AdaGC",
    "AutoClip",
    "Diagnosis",
    "GradientDiagnostician",
    "GradientMonitor",
    "Histogram",
    "HistogramLogger",
    "InitReport",
    "InitSwap",
    "LayerIndex",
    "LossSpikeDetector",
    "MomentReset",
    "NonFiniteGradientError",
    "NonFiniteGuard",
    "NormClip",
    "OutlierStepTest",
    "PercentilePolicy",
    "RollbackLimitError",
    "SkipDecision",
    "SnapshotRing",
    "StabilityAutopilot",
    "StepUndo",
    "TensorStats",
    "UpdateJumpDetector",
    "UpdateMonitor",
    "ValueClip",
    "ZClip",
    "ZScorePolicy",
    "activation_stats",
    "adagc_clip_",
    "adam_update_norms",
    "adaptive_clip_grad_",
    "clip_grad_norm_to",
    "clip_grad_value_",
    "grad_flow_image",
    "gradient_norms",
    "init_swap",
    "layer_norms",
    "lsuv_",
    "nonfinite_counts",
    "reset_adam_moments_",
    "spike_aware_clip_",
    "tensor_histograms",
    "tensor_norms",
    "tensor_stats",
    "total_norm",
]

__version__ = "0.1.0"
