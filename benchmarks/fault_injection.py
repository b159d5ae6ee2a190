"""Fault injection: five kinds of trouble, each met by no remedy, the autopilot and the peers' answers.

The run is the corrupted-batch recipe's (the deep-MLP recipe's ``relu_he`` made 4 layers deep, L2 0.02,
SGD with momentum and a cosine schedule) on the embedded digits, ``--steps`` optimizer steps of batch
64, on the CPU with one thread (``--adam``: Adam at 2e-3, where the moment-reset rung can act). At step
``--fault-step`` one fault is injected:

- ``bad_batch``: one batch with inputs x1e3 and targets scrambled;
- ``burst``: five such batches in a row;
- ``lr_spike``: one optimizer step at 300 times the learning rate;
- ``nan_grad``: a NaN in one gradient element (on one process: the two-rank case, a NaN in one rank's
  shard, is checked by ``tests/test_sharded.py`` and ``tests/test_guard.py``, not timed here);
- ``drift``: the learning rate grows by 3% a step from there on, a slow drift to divergence;

and ``clean`` is the run without a fault. Each is trained with nothing added, with
``StabilityAutopilot(watch_updates=True, verbose=False)`` (the update-ratio watch is what meets the
drift), with ZClip alone, with a fixed ``NormClip(1.0)`` and with
Lightning's ``SpikeDetection`` (which stops the run on a spike). For each the table gives the step the
remedy first acted at relative to the fault (0: at the faulty step itself, before its update), the
optimizer steps lost (skipped, undone by a rollback, or never run after a halt), the final training loss
(the whole training set, after the last step) relative to the clean run with nothing added, and the host
reads per step in the remedy's own hooks (``.item()``, ``.tolist()``, ``bool()``, ``float()``,
``int()`` on a tensor; the trainer logs nothing, so every step is a non-logging step).

Run: ``python benchmarks/fault_injection.py [--steps 300] [--fault-step 150] [--seeds 0]
[--json benchmarks/fault_injection.json] [--write-readme]``.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from recipes.data import load_digits_split  # noqa: E402
from recipes.deep_mlp import DeepMLP  # noqa: E402
from stability_callbacks import NormClip, StabilityAutopilot, ZClip  # noqa: E402

#: The corrupted-batch recipe's run (``recipes/corrupted.py``: ``relu_he`` made 4 layers deep, strongly
#: L2-regularised): its training loss settles on a floor that hardly depends on the path taken to it, so
#: a final loss measures the damage a fault left, not the randomness of the path.
MODEL: dict[str, Any] = dict(depth=4, activation="relu", init="he", lr=0.05, weight_decay=0.02, cosine=True)
FAULTS = ("clean", "bad_batch", "burst", "lr_spike", "nan_grad", "drift")
BURST = 5
LR_SPIKE = 300.0
DRIFT = 1.03
BEGIN, END = "<!-- fault-injection:begin -->", "<!-- fault-injection:end -->"


class BadBatches(Callback):
    """Corrupts the batches of the optimizer steps ``steps`` in place: inputs x1e3, targets scrambled (the
    corruption of the corrupted-batch recipe's ``CorruptBatch``)."""

    def __init__(self, steps: range) -> None:
        self.steps = steps

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step in self.steps:
            x, y = batch
            perm = torch.randperm(y.shape[0], generator=torch.Generator().manual_seed(trainer.global_step))
            with torch.no_grad():
                y.copy_(y[perm])
                x.mul_(1e3)


class LrFault(Callback):
    """Multiplies every learning rate by ``factor(step)`` for the optimizer step ``step`` (restored after)."""

    def __init__(self, factor: Callable[[int], float]) -> None:
        self.factor = factor
        self._saved: list[float] | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        f = self.factor(trainer.global_step)
        if f != 1.0:
            opt = trainer.optimizers[0]
            self._saved = [g["lr"] for g in opt.param_groups]
            for g in opt.param_groups:
                g["lr"] *= f

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self._saved is not None:
            for g, lr in zip(trainer.optimizers[0].param_groups, self._saved, strict=True):
                g["lr"] = lr
            self._saved = None


class NanGrad(Callback):
    """Writes a NaN into one element of the first layer's gradient at optimizer step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step == self.step:
            grad = next(p for p in pl_module.parameters() if p.grad is not None).grad
            assert grad is not None
            grad.view(-1)[0] = float("nan")


def fault_callbacks(fault: str, step: int) -> list[Callback]:
    if fault == "bad_batch":
        return [BadBatches(range(step, step + 1))]
    if fault == "burst":
        return [BadBatches(range(step, step + BURST))]
    if fault == "lr_spike":
        return [LrFault(lambda t: LR_SPIKE if t == step else 1.0)]
    if fault == "nan_grad":
        return [NanGrad(step)]
    if fault == "drift":
        return [LrFault(lambda t: DRIFT ** (t - step) if t >= step else 1.0)]
    return []


class Acted(Callback):
    """Records the first optimizer step at which the remedy acted, and counts its host reads per step."""

    def __init__(self, remedy: Callback | None) -> None:
        self.remedy = remedy
        self.first: int | None = None
        self.halted: int | None = None
        self._last = 0.0

    def _count(self) -> float:
        r = self.remedy
        if isinstance(r, StabilityAutopilot):
            warnings = sum("[early warning]" in e for e in r.events)
            return float(r.skipped + r.rollbacks + r.moment_resets + warnings)
        if r is not None and hasattr(r, "clipped_steps"):
            return float(r.clipped_steps)  # type: ignore[attr-defined]
        return 0.0

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        count = self._count()
        if count > self._last and self.first is None and trainer.global_step - 1 >= 0:
            self.first = trainer.global_step - 1
        self._last = count


class HostReads:
    """Counts host reads of tensors (``.item()``, ``.tolist()``, ``bool()``, ``float()``, ``int()``) made
    inside an object's per-step hooks, while the ``with`` block lasts."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__")
    HOOKS = ("on_train_batch_start", "on_before_backward", "on_before_optimizer_step", "on_train_batch_end")

    def __init__(self, obj: Any | None) -> None:
        self.obj = obj
        self.count = 0
        self._active = False
        self._originals: dict[str, Any] = {}

    def __enter__(self) -> HostReads:
        if self.obj is None:
            return self
        self._originals = {n: getattr(Tensor, n) for n in self.NAMES}
        for name, original in self._originals.items():

            def wrapped(t: Tensor, *a: Any, _original: Any = original, **k: Any) -> Any:
                self.count += self._active
                return _original(t, *a, **k)

            setattr(Tensor, name, wrapped)
        for hook in self.HOOKS:
            inner = getattr(self.obj, hook)

            def inside(*a: Any, _inner: Any = inner, **k: Any) -> Any:
                self._active = True
                try:
                    return _inner(*a, **k)
                finally:
                    self._active = False

            setattr(self.obj, hook, inside)
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, original in self._originals.items():
            setattr(Tensor, name, original)


def remedy(name: str) -> Callback | None:
    if name == "autopilot":
        return StabilityAutopilot(watch_updates=True, verbose=False)
    if name == "ZClip":
        return ZClip()
    if name == "NormClip(1.0)":
        return NormClip(1.0)
    if name == "SpikeDetection":
        from lightning.pytorch.callbacks import SpikeDetection

        return SpikeDetection()
    return None


REMEDIES = ("none", "autopilot", "ZClip", "NormClip(1.0)", "SpikeDetection")


def lost_steps(ap: StabilityAutopilot) -> int:
    """Steps skipped plus steps undone by rollbacks (from the timeline)."""
    undone = 0
    for event in ap.events:
        m = re.match(r"step (\d+): \[rollback\].*snapshot taken before step (\d+)", event)
        if m:
            undone += int(m.group(1)) - int(m.group(2))
    return ap.skipped + undone


def run(fault: str, remedy_name: str, seed: int, steps: int, fault_step: int, adam: bool) -> dict[str, Any]:
    x, y, _, _ = load_digits_split()
    torch.manual_seed(seed)
    model = DeepMLP(**{**MODEL, **(dict(optimizer="adam", lr=2e-3) if adam else {})})
    cb = remedy(remedy_name)
    acted = Acted(cb)
    loader = DataLoader(
        TensorDataset(x, y), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    halted: int | None = None
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, HostReads(cb) as reads:
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=steps,
            max_epochs=None,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            default_root_dir=tmp,
            callbacks=[*fault_callbacks(fault, fault_step), *([cb] if cb is not None else []), acted],
        )
        try:
            trainer.fit(model, loader)
        except Exception as error:  # SpikeDetection stops the run; a RollbackLimitError too
            halted = trainer.global_step
            acted.first = acted.first if acted.first is not None else halted
            kind = type(error).__name__
        else:
            kind = ""
    seconds = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        loss = nn.functional.cross_entropy(model(x), y).item()
    done = trainer.global_step
    lost = lost_steps(cb) if isinstance(cb, StabilityAutopilot) else 0
    if halted is not None:
        lost += steps - halted
    first = acted.first
    return {
        "fault": fault,
        "remedy": remedy_name,
        "seed": seed,
        "detection": None if first is None or fault == "clean" or first < fault_step else first - fault_step,
        "acted_before_fault": first is not None and first < fault_step,
        "lost": lost,
        "loss": loss,
        "halted": kind or None,
        "reads_per_step": reads.count / max(done, 1),
        "seconds": seconds,
        "events": list(cb.events) if isinstance(cb, StabilityAutopilot) else [],
    }


def table(rows: list[dict[str, Any]]) -> str:
    clean = {r["seed"]: r["loss"] for r in rows if r["fault"] == "clean" and r["remedy"] == "none"}
    lines = [
        "| fault | remedy | detected (steps after the fault) | steps lost | final loss / clean | within 5% "
        "| host reads per step |",
        "|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["fault"], r["remedy"]), []).append(r)
    for (fault, name), rs in groups.items():
        ratio = statistics.median(r["loss"] / clean[r["seed"]] for r in rs)
        detected = [r["detection"] for r in rs if r["detection"] is not None]
        if fault == "clean":
            det = "acted" if any(r["acted_before_fault"] for r in rs) else "-"
        else:
            det = f"{statistics.median(detected):g}" if detected else "never"
        halted = next((r["halted"] for r in rs if r["halted"]), None)
        lost = f"{statistics.median(r['lost'] for r in rs):g}" + (f" ({halted})" if halted else "")
        healed = "yes" if ratio <= 1.05 else "no"
        reads = statistics.median(r["reads_per_step"] for r in rs)
        lines.append(f"| {fault} | {name} | {det} | {lost} | {ratio:.3f} | {healed} | {reads:.2f} |")
    return "\n".join(lines)


def write_readme(text: str, readme: Path = ROOT / "README.md") -> None:
    content = readme.read_text()
    if BEGIN not in content or END not in content:
        raise SystemExit(f"{readme} has no {BEGIN} ... {END} markers")
    head, rest = content.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--fault-step", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--faults", nargs="+", choices=FAULTS, default=list(FAULTS))
    parser.add_argument("--remedies", nargs="+", choices=REMEDIES, default=list(REMEDIES))
    parser.add_argument("--adam", action="store_true", help="train with Adam instead of SGD")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "fault_injection.json")
    parser.add_argument("--write-readme", action="store_true", help="write the table into README.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    import logging
    import warnings

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    faults = ["clean", *(f for f in args.faults if f != "clean")]
    remedies = ["none", *(r for r in args.remedies if r != "none")]
    rows = [
        run(fault, name, seed, args.steps, args.fault_step, args.adam)
        for seed in args.seeds
        for fault in faults
        for name in remedies
    ]
    command = "python benchmarks/fault_injection.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = (
        f"Faults at step {args.fault_step} of {args.steps}, the corrupted-batch recipe's 4-layer ReLU MLP "
        f"({'Adam' if args.adam else 'SGD with momentum'}) on the digits, "
        f"CPU, one thread, seeds {args.seeds} (`{command.strip()}`):\n"
    )
    text = header + "\n" + table(rows)
    print(text)
    for r in rows:
        if r["remedy"] == "autopilot" and r["events"]:
            print(f"\n{r['fault']} (seed {r['seed']}), the autopilot's timeline:")
            for event in r["events"]:
                print(f"  {event}")
    args.json.write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1)
    )
    print(f"\nwrote {args.json}")
    if args.write_readme:
        write_readme(text)
        print("wrote the table into README.md")


if __name__ == "__main__":
    main()
