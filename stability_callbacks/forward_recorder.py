"""Watch the forward passes of a real step: :class:`ForwardRecorder`; run ``torch.compile``'d code eagerly.

Plain PyTorch, no Lightning. :class:`ForwardRecorder` watches the forward passes that run while it is
started: hooks on every module keep the stack of running modules, and a ``TorchFunctionMode`` sees
functional activations. A function called inside an activation module (HF's ``NewGELUActivation``
calls ``torch.tanh``) is part of that activation, not a second one. It records the order of layers and
activations (what initialisation reads) and hands every activation output to a callback (what
:class:`~stability_callbacks.activations.ActivationMonitor` measures). Start it around a real training
step to learn a model's structure without guessing how to call the model. Which modules and functions
are activations is told by :mod:`stability_callbacks.activation_kinds`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from stability_callbacks.activation_kinds import (
    function_activation,
    function_name,
    is_leaf_layer,
    is_weight_layer,
    module_activation,
    recurrent_activation,
)
from stability_callbacks.init_schemes import Activation
from stability_callbacks.stats import user_name

__all__ = ["ActivationEvent", "ForwardRecorder", "compiled_modules", "eager_compiled"]


# -- torch.compile --------------------------------------------------------------------------------


def compiled_modules(model: nn.Module) -> list[str]:
    """User names of the parts of ``model`` that ``torch.compile`` wraps (``[""]`` for the model itself
    when Lightning compiled it); module hooks added after compilation do not run in compiled code."""
    found = [user_name(n) for n, m in model.named_modules() if hasattr(m, "_orig_mod")]
    if getattr(model, "_compiler_ctx", None) and "" not in found:
        found.insert(0, "")
    return found


@contextmanager
def eager_compiled() -> Iterator[bool]:
    """Run ``torch.compile``'d code eagerly inside (``torch.compiler.set_stance("force_eager")``), so that
    module hooks and ``TorchFunctionMode`` see every call; other code is unaffected. Yields ``False``
    (and changes nothing) where this torch has no ``set_stance``."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    try:
        stance = None if set_stance is None else set_stance("force_eager")
    except RuntimeError:  # called from inside a compiled region: leave the stance alone
        stance = None
    if stance is None:
        yield False
        return
    with stance:
        yield True


# -- the recorder ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ActivationEvent:
    """One activation seen by a :class:`ForwardRecorder`.

    Attributes:
        name: the activation module's user name; for a function, the user name of the module that called
            it, a dot and the function (``layers.0.relu``; ``relu_1`` for its second call there), or the
            function alone when the model itself called it.
        activation: what it applies.
        output: its output (only the first tensor of a tuple).
        module: the activation module (``None`` for a function, or a recurrent layer's hidden states).
        in_layer: it ran inside a module that owns parameters and whose submodules own none (part of a
            layer such as a gated unit, rather than an activation that follows a layer).
    """

    name: str
    activation: Activation
    output: Tensor | None
    module: nn.Module | None
    in_layer: bool


class _Mode(TorchFunctionMode):
    """Hands every call to its recorder while the recorder is active."""

    def __init__(self, recorder: ForwardRecorder) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_function__(
        self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.recorder.active:
            self.recorder._function_called(func, args, kwargs, out)
        return out


class ForwardRecorder:
    """Watches the forward passes that run between :meth:`start` and :meth:`stop`.

    Hooks on every module keep the stack of running modules; a ``TorchFunctionMode`` sees the
    functional activations. It records, in order, each layer's output (``("layer", name)``, layers as
    in :func:`is_weight_layer`) and each activation (an :class:`ActivationEvent`): activation modules
    (:func:`module_activation`), activation functions called outside any activation module, and, with
    ``recurrent=True``, the hidden states of recurrent layers (:func:`recurrent_activation`).

    ``torch.compile``'d code runs eagerly while it records (:func:`eager_compiled`), so that the hooks
    run. Nothing it does can fail the forward pass: an error in its own bookkeeping is kept in
    :attr:`error` and recording stops. Names are user names (no ``_orig_mod.``).

    Args:
        on_activation: called with each :class:`ActivationEvent` as it happens (e.g. to compute
            statistics on the device); ``None`` to only record.
        recurrent: also report the hidden states of recurrent layers.
        functions: also see functional activations (a ``TorchFunctionMode`` while recording).
        keep_outputs: keep each event's output tensor in :attr:`events` (off by default: only the
            callback sees it, so no activation outlives the step).
        watch: more modules to report as activations (e.g. ``nn.Softsign``, which initialisation has no
            gain for); their activation kind is their lower-cased class name.
    """

    def __init__(
        self,
        on_activation: Callable[[ActivationEvent], None] | None = None,
        recurrent: bool = False,
        functions: bool = True,
        keep_outputs: bool = False,
        watch: Callable[[nn.Module], bool] | None = None,
    ) -> None:
        self.on_activation = on_activation
        self.watch = watch
        self.recurrent = recurrent
        self.functions = functions
        self.keep_outputs = keep_outputs
        self.events: list[tuple[str, Any]] = []
        self.modules_run: set[str] = set()
        self.error: str | None = None
        self.active = False
        self._stack: list[tuple[str, int]] = []  # (user name, flags) of the running modules
        self._calls: dict[tuple[str, str], int] = {}
        self._exit: ExitStack | None = None

    _ACT, _LAYER, _LEAF = 1, 2, 4

    @property
    def recording(self) -> bool:
        """Whether hooks are in place."""
        return self._exit is not None

    def start(self, model: nn.Module) -> ForwardRecorder:
        """Hook ``model`` and begin recording (a no-op while recording); returns ``self``."""
        if self._exit is not None:
            return self
        stack = ExitStack()
        for raw, m in model.named_modules():
            flags = 0
            act = module_activation(m)
            if act is None and self.recurrent:
                act = recurrent_activation(m)
            if act is None and self.watch is not None and self.watch(m):
                act = Activation(type(m).__name__.lower())
            if act is not None:
                flags |= self._ACT
            if is_weight_layer(m):
                flags |= self._LAYER
            if is_leaf_layer(m):
                flags |= self._LEAF
            name = user_name(raw)
            stack.callback(m.register_forward_pre_hook(self._make_pre(name, flags)).remove)
            post = self._make_post(name, flags, act)
            stack.callback(m.register_forward_hook(post, always_call=True).remove)
        stack.enter_context(eager_compiled())
        if self.functions:
            stack.enter_context(_Mode(self))
        self._exit = stack
        self._stack = []
        self._calls = {}
        self.active = True
        return self

    def stop(self) -> bool:
        """Remove the hooks and end recording; ``True`` when this call ended a recording."""
        if self._exit is None:
            return False
        self.active = False
        exit_stack, self._exit = self._exit, None
        exit_stack.close()
        self._stack = []
        return True

    def __enter__(self) -> ForwardRecorder:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_exit=None, _stack=[], active=False, events=[], on_activation=None, watch=None)
        return state

    # -- what the hooks do ------------------------------------------------------------------------

    def _fail(self, error: BaseException) -> None:
        self.error = f"{type(error).__name__}: {error}"
        self.active = False

    def _inside(self, flag: int) -> bool:
        return any(f & flag for _, f in self._stack)

    def _make_pre(self, name: str, flags: int) -> Callable[..., None]:
        def pre(module: nn.Module, args: Any) -> None:
            if self.active:
                self._stack.append((name, flags))
                self.modules_run.add(name)

        return pre

    def _make_post(self, name: str, flags: int, act: Activation | None) -> Callable[..., None]:
        def post(module: nn.Module, args: Any, output: Any) -> None:
            if not self.active or not self._stack:
                return
            try:
                self._stack.pop()
                if self._inside(self._ACT):
                    return  # inside an activation module: part of it
                if flags & self._ACT and act is not None:
                    out = output[0] if isinstance(output, (tuple, list)) and output else output
                    if hasattr(out, "data") and not isinstance(out, Tensor):  # a PackedSequence
                        out = out.data
                    via = Activation(act.kind, act.slope, name)
                    self._emit(
                        ActivationEvent(
                            name,
                            via,
                            out if isinstance(out, Tensor) else None,
                            module,
                            self._inside(self._LEAF),
                        )
                    )
                elif flags & self._LAYER:
                    self.events.append(("layer", name))
            except Exception as error:  # never fail the model's forward pass
                self._fail(error)

        return post

    def _function_called(self, func: Any, args: Sequence[Any], kwargs: Mapping[str, Any], out: Any) -> None:
        try:
            act = function_activation(func, args, kwargs)
            if act is None or self._inside(self._ACT):
                return
            owner = self._stack[-1][0] if self._stack else ""
            short = function_name(func)
            count = self._calls.get((owner, short), 0)
            self._calls[(owner, short)] = count + 1
            name = (f"{owner}." if owner else "") + short + (f"_{count}" if count else "")
            via = Activation(act.kind, act.slope, f"{act.via} in {owner or 'the model'}")
            self._emit(
                ActivationEvent(
                    name, via, out if isinstance(out, Tensor) else None, None, self._inside(self._LEAF)
                )
            )
        except Exception as error:  # never fail the model's forward pass
            self._fail(error)

    def _emit(self, event: ActivationEvent) -> None:
        if self.on_activation is not None:
            self.on_activation(event)
        if not self.keep_outputs:
            event = ActivationEvent(event.name, event.activation, None, event.module, event.in_layer)
        self.events.append(("act", event))

    # -- what it learnt ---------------------------------------------------------------------------

    def following(self) -> dict[str, Activation | None]:
        """The activation that runs right after each layer's first call (``None`` where a layer or
        nothing comes next). Activations inside a layer (see :class:`ActivationEvent`) do not count."""
        events = [e for e in self.events if e[0] == "layer" or not e[1].in_layer]
        found: dict[str, Activation | None] = {}
        for i, (kind, value) in enumerate(events):
            if kind == "layer" and value not in found:
                nxt = events[i + 1] if i + 1 < len(events) else None
                found[value] = nxt[1].activation if nxt is not None and nxt[0] == "act" else None
        return found

    def activations(self) -> list[str]:
        """Names of the activations seen, once each, in the order they first ran."""
        return list(dict.fromkeys(e[1].name for e in self.events if e[0] == "act"))
