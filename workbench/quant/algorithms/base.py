"""The PTQ algorithm pipeline: algorithms that change a model's weights and biases around calibration.

The interface (stable: cle.py, bias_correction.py and adaround.py are built on it)
-----------------------------------------------------------------------------------
An algorithm is a class in its own file, registered by `@register_algorithm("name")`, plus one import line in
`algorithms/__init__.py`. It declares:

- `Options`: a subclass of `AlgorithmOptions` (a StrictModel): its recipe options, validated when the recipe is
  (`stages.calibrate.algorithms`), so an unknown option or a bad value is refused before anything runs;
- `phase`: "before_ranges" (runs after BatchNorm folding and quantizer insertion, every quantizer off, before the
  activation ranges are calibrated: it changes the float model the ranges are then measured on, e.g. CLE) or
  "after_ranges" (runs on the calibrated fake-quant model, after the ranges are set: e.g. bias correction,
  AdaRound);
- `statistics(ctx, opts) -> list[StatisticRequest]`: the per-channel statistics of layer inputs/outputs it needs.
  The pipeline collects every request of one phase in ONE pass over the calibration data (requests of two
  algorithms for the same tensor share it), with every quantizer off (float statistics) unless the request says
  `quantized=True`, before the phase's first algorithm runs: statistics describe the model as the phase began;
- `apply(ctx, opts, stats) -> AlgorithmRecord`: transforms `ctx.model` in place and says what it skipped and why
  (`record.skipped[what] = why`; an algorithm that does not apply at all skips everything and the run goes on).
  The pipeline fills in `seconds`, the per-layer change norms and the metric after the algorithm, and it finds
  what changed itself: an algorithm needs no bookkeeping of its own beyond `skipped` and `notes`.

`AlgorithmContext` hands an algorithm the model, the Int8Config, the QuantResult (which layers are quantized),
the calibration `forward_loop`, the example images and helpers: `float_mode()` (every quantizer off for a
block), `images(n)` (the first n calibration images, as the model receives them), `quantized_weight(layer)`
(the layer's weight through its own weight quantizer: whatever the profile's arithmetic is, bits, granularity,
power-of-two scales, never an assumed 8-bit per-channel) and `replace_module(name, kind)` (a module swap from
MODULE_KINDS that is saved and replayed, e.g. ReLU6 -> ReLU).

State: every tensor of the model's state_dict that an algorithm changed (weights, biases, weight quantizers'
ranges, a bias parameter it created) and every module it swapped is the run's `ptq_state.pt` (a plain dict of
tensors and strings, `torch.save`d, loaded with weights_only=True and checked against the model: names and
shapes). `quant.ptq.restore_` re-applies it after inserting the quantizers, so --resume and the notebook's
open_run rebuild the exact model without calibration data.

This module imports no torch at import time: recipes are validated without it.
"""

from __future__ import annotations

import contextlib
import difflib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Literal

from pydantic import model_serializer, model_validator

from ...schema import StrictModel

if TYPE_CHECKING:
    import torch
    from torch import nn

Phase = Literal["before_ranges", "after_ranges"]
PHASES: tuple[Phase, ...] = ("before_ranges", "after_ranges")
STATE_FILE = "ptq_state.pt"
STATE_FORMAT = 1


class AlgorithmOptions(StrictModel):
    """Base of every algorithm's recipe options (unknown keys are errors)."""


class Algorithm:
    """Base of every PTQ algorithm (see the module docstring)."""

    name: ClassVar[str] = ""
    Options: ClassVar[type[AlgorithmOptions]] = AlgorithmOptions
    phase: ClassVar[Phase] = "after_ranges"

    def statistics(self, ctx: AlgorithmContext, opts: AlgorithmOptions) -> list[StatisticRequest]:
        return []

    def apply(self, ctx: AlgorithmContext, opts: AlgorithmOptions, stats: Statistics) -> AlgorithmRecord:
        raise NotImplementedError


ALGORITHMS: dict[str, type[Algorithm]] = {}


def register_algorithm(name: str):
    """Decorator: register an Algorithm subclass under `name` (the recipe's name for it)."""

    def decorator(cls: type[Algorithm]) -> type[Algorithm]:
        if name in ALGORITHMS:
            raise ValueError(f"PTQ algorithm {name!r} is registered twice")
        if cls.phase not in PHASES:
            raise ValueError(f"PTQ algorithm {name!r}: phase must be one of {PHASES}, not {cls.phase!r}")
        cls.name = name
        ALGORITHMS[name] = cls
        return cls

    return decorator


def _known() -> str:
    return ", ".join(sorted(ALGORITHMS)) or "(none registered)"


class AlgorithmStep(StrictModel):
    """One entry of `stages.calibrate.algorithms`: a name, or a mapping with `name` and that algorithm's options.
    Stored (calibration.json, fingerprints) as the mapping with every option filled in."""

    name: str
    options: dict[str, Any] = {}

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = {"name": value}
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            raise ValueError("an algorithm is a name (e.g. cle) or a mapping with `name:` and its options "
                             f"(e.g. {{name: bias_correction, mode: full}}); known algorithms: {_known()}")
        name = value["name"]
        if name not in ALGORITHMS:
            close = difflib.get_close_matches(name, list(ALGORITHMS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown PTQ algorithm {name!r}{hint}; known algorithms: {_known()}")
        given = value["options"] if set(value) == {"name", "options"} and isinstance(value["options"], dict) \
            else {k: v for k, v in value.items() if k != "name"}
        options_cls = ALGORITHMS[name].Options
        try:
            opts = options_cls(**given)
        except Exception as e:  # pydantic's ValidationError: say which algorithm and which option
            errors = getattr(e, "errors", lambda: [])()
            shown = "; ".join(f"{'.'.join(map(str, err['loc'])) or '(options)'}: {err['msg']}" for err in errors[:3])
            known = ", ".join(options_cls.model_fields) or "none"
            raise ValueError(f"algorithm {name!r}: {shown or e} (its options: {known})") from None
        return {"name": name, "options": opts.model_dump(mode="json")}

    @model_serializer(mode="plain")
    def _dump(self) -> dict[str, Any]:
        return {"name": self.name, **self.options}

    def parsed(self) -> tuple[type[Algorithm], AlgorithmOptions]:
        cls = ALGORITHMS[self.name]
        return cls, cls.Options(**self.options)


def order_problem(steps: list[AlgorithmStep]) -> str | None:
    """Before-ranges algorithms run first whatever the list says: a list that puts one after an after-ranges one
    would not run in the order written, so it is refused (None: the order is fine)."""
    seen_after = None
    for step in steps:
        phase = ALGORITHMS[step.name].phase
        if phase == "after_ranges":
            seen_after = seen_after or step.name
        elif seen_after is not None:
            return (f"{step.name} changes the weights before the activation ranges are calibrated, so it runs before "
                    f"{seen_after}, which needs the calibrated model: list {step.name} first")
    return None


# ---------------------------------------------------------------------------------------------------------
# Statistics: per-channel moments of layer inputs/outputs, collected once per phase
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StatisticRequest:
    """Per-channel statistics of one tensor: a module's first input or its output, in float (quantizers off)
    or through the quantized model. Channels are axis 1 for convolutions, the last axis for Linear."""

    layer: str
    side: Literal["input", "output"] = "output"
    quantized: bool = False


@dataclass
class ChannelStats:
    """Running per-channel sums (float64) of one tensor over the calibration data."""

    count: int = 0
    sum: torch.Tensor | None = None
    sum_sq: torch.Tensor | None = None
    min: torch.Tensor | None = None
    max: torch.Tensor | None = None

    def update(self, x: torch.Tensor, axis: int) -> None:
        import torch

        x = x.detach().double().movedim(axis, -1)
        x = x.reshape(-1, x.shape[-1])
        s, sq = x.sum(0), (x * x).sum(0)
        lo, hi = x.amin(0), x.amax(0)
        if self.sum is None:
            self.sum, self.sum_sq, self.min, self.max = s, sq, lo, hi
        else:
            self.sum, self.sum_sq = self.sum + s, self.sum_sq + sq
            self.min, self.max = torch.minimum(self.min, lo), torch.maximum(self.max, hi)
        self.count += x.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)

    @property
    def std(self) -> torch.Tensor:
        return (self.sum_sq / max(self.count, 1) - self.mean ** 2).clamp(min=0).sqrt()


Statistics = dict[StatisticRequest, ChannelStats]


def collect_statistics(ctx: AlgorithmContext, requests: list[StatisticRequest]) -> tuple[Statistics, int]:
    """Every request in as few passes over the calibration data as possible (one per quantized flag); returns the
    statistics and how many passes were made."""
    from torch import nn

    stats: Statistics = {}
    modules = dict(ctx.model.named_modules())
    unique = list(dict.fromkeys(requests))
    passes = 0
    for quantized in (False, True):
        wanted = [r for r in unique if r.quantized == quantized]
        if not wanted:
            continue
        handles = []
        for request in wanted:
            stats[request] = ChannelStats()
            module = modules[request.layer]
            axis = -1 if isinstance(module, nn.Linear) else 1

            def hook(module, args, output, request=request, axis=axis):
                x = args[0] if request.side == "input" else output
                stats[request].update(x, axis if x.dim() > 1 else 0)

            handles.append(module.register_forward_hook(hook))
        try:
            with contextlib.nullcontext() if quantized else ctx.float_mode():
                ctx.forward_loop(ctx.model)
        finally:
            for h in handles:
                h.remove()
        passes += 1
    return stats, passes


# ---------------------------------------------------------------------------------------------------------
# What an algorithm is handed and what it hands back
# ---------------------------------------------------------------------------------------------------------


@dataclass
class AlgorithmRecord:
    """What one algorithm did: for calibration.json, metrics.json and the report."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    phase: str = ""
    seconds: float = 0.0
    # layer -> {"weight": relative L2 change, "bias": ...} (the pipeline measures it)
    changes: dict[str, dict[str, float]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # what -> why
    notes: list[str] = field(default_factory=list)
    metric_after: float | None = None  # the run's metric after this algorithm, where evaluation data was given
    metric_model: str = ""  # "float" (before_ranges: the float model) or "int8" (after_ranges)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "options": self.options, "phase": self.phase, "seconds": round(self.seconds, 3),
                "layers_changed": len(self.changes), "changes": self.changes, "skipped": self.skipped,
                "notes": self.notes, "metric_after": self.metric_after, "metric_model": self.metric_model}


# Module swaps an algorithm may make (saved by kind in ptq_state.pt and replayed by restore_): a closed list, so a
# state file can never name a class to build.
MODULE_KINDS: dict[str, Callable[[], nn.Module]] = {}


def _module_kinds() -> dict[str, Callable[[], nn.Module]]:
    from torch import nn

    from .channel_clip import ChannelClip

    if not MODULE_KINDS:
        MODULE_KINDS.update({"ReLU": lambda: nn.ReLU(inplace=False), "ChannelClip": ChannelClip})
    return MODULE_KINDS


class _EnoughImages(Exception):
    """Raised from a hook to end a forward loop once enough images were seen."""


@dataclass
class AlgorithmContext:
    """What an algorithm works with (see the module docstring)."""

    model: nn.Module
    config: Any  # the Int8Config (or the calibrate stage's options)
    result: Any  # the QuantResult: result.quantized names the quantized layers
    forward_loop: Callable[[nn.Module], None]
    example_input: torch.Tensor
    arithmetic: Any = None  # the target profile's Arithmetic, where the profiles feature gives one
    replaced: dict[str, str] = field(default_factory=dict)  # module name -> MODULE_KINDS key (swaps made so far)

    def layers(self) -> dict[str, nn.Module]:
        """The quantized layers, by name, in model order."""
        modules = dict(self.model.named_modules())
        return {name: modules[name] for name in self.result.quantized}

    @contextlib.contextmanager
    def float_mode(self) -> Iterator[None]:
        """Every enabled quantizer off for the block (the float model), put back after."""
        from modelopt.torch.quantization.nn import TensorQuantizer

        quantizers = [q for q in self.model.modules() if isinstance(q, TensorQuantizer) and q.is_enabled]
        for q in quantizers:
            q.disable()
        try:
            yield
        finally:
            for q in quantizers:
                q.enable()

    def images(self, count: int) -> torch.Tensor:
        """The first `count` calibration images (fewer where the data has fewer), as the model receives them."""
        import torch

        seen: list[torch.Tensor] = []
        total = 0

        def grab(module, args):
            nonlocal total
            x = args[0].detach()
            seen.append(x[: count - total])
            total += seen[-1].shape[0]
            if total >= count:
                raise _EnoughImages

        handle = self.model.register_forward_pre_hook(grab)
        try:
            with self.float_mode():
                self.forward_loop(self.model)
        except _EnoughImages:
            pass
        finally:
            handle.remove()
        return torch.cat(seen) if seen else self.example_input[:0]

    def quantized_weight(self, layer: str | nn.Module) -> torch.Tensor:
        """The layer's weight as its own weight quantizer computes it (fake-quantized), detached."""
        import torch

        module = self.layers()[layer] if isinstance(layer, str) else layer
        with torch.no_grad():
            q = module.weight_quantizer
            return q(module.weight).detach() if q.is_enabled else module.weight.detach().clone()

    def replace_module(self, name: str, kind: str) -> None:
        """Swap the module `name` for a fresh one of MODULE_KINDS[kind] (saved in the state and replayed)."""
        replace_module(self.model, name, kind)
        self.replaced[name] = kind


def replace_module(model: nn.Module, name: str, kind: str) -> None:
    kinds = _module_kinds()
    if kind not in kinds:
        raise ValueError(f"module kind {kind!r} is not one an algorithm may swap in ({', '.join(kinds)})")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not hasattr(parent, child):
        raise KeyError(name)
    module = kinds[kind]()
    setattr(parent, child, module)
    if hasattr(module, "attach"):  # a module that must see its parent's forwards (ChannelClip counts its calls)
        module.attach(parent)


# ---------------------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------------------


@dataclass
class PipelineResult:
    """The records of every algorithm run so far and the state that reproduces the model they left."""

    records: list[AlgorithmRecord] = field(default_factory=list)
    tensors: dict[str, Any] = field(default_factory=dict)  # state_dict key -> final value (changed by an algorithm)
    modules: dict[str, str] = field(default_factory=dict)  # module name -> MODULE_KINDS key
    statistics_passes: int = 0
    # the run's metric as each phase began (before_ranges: the float model; after_ranges: the calibrated model
    # before any after-ranges algorithm, i.e. PTQ alone), where evaluation data was given
    metric_before: dict[str, float] = field(default_factory=dict)

    def state(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "tensors": dict(self.tensors), "modules": dict(self.modules)}


def run_phase(phase: Phase, steps: list[AlgorithmStep], ctx: AlgorithmContext, pipeline: PipelineResult,
              evaluate: Callable[[nn.Module], float] | None = None,
              after_each: Callable[[], None] | None = None) -> None:
    """Run the steps of `phase` in order: collect their statistics in one pass, apply each, record what it changed.

    `after_each()` runs after each algorithm before its changes are measured (before_ranges: re-measure the weight
    ranges the quantizers were given on the weights before it). `evaluate(model)` gives the run's metric."""
    chosen = [(step, *step.parsed()) for step in steps if ALGORITHMS[step.name].phase == phase]
    if not chosen:
        return
    if evaluate is not None:
        import torch

        evaluate = torch.no_grad()(evaluate)
    algorithms = [(step, cls(), opts) for step, cls, opts in chosen]
    if evaluate is not None:
        with ctx.float_mode() if phase == "before_ranges" else contextlib.nullcontext():
            pipeline.metric_before[phase] = _number(evaluate(ctx.model))
    asked = {id(algo): algo.statistics(ctx, opts) for _, algo, opts in algorithms}
    requests = [r for found in asked.values() for r in found]
    start = time.perf_counter()
    stats, passes = collect_statistics(ctx, requests) if requests else ({}, 0)
    stats_seconds = time.perf_counter() - start
    pipeline.statistics_passes += passes
    for step, algo, opts in algorithms:
        before = _snapshot(ctx.model)
        replaced_before = dict(ctx.replaced)
        start = time.perf_counter()
        # before the ranges, no activation quantizer has a range yet: the algorithm sees the float model
        with ctx.float_mode() if phase == "before_ranges" else contextlib.nullcontext():
            record = algo.apply(ctx, opts, stats)
        if after_each is not None:
            after_each()
        record.seconds = time.perf_counter() - start
        record.name, record.phase, record.options = step.name, phase, dict(step.options)
        if asked[id(algo)]:  # its statistics came from the phase's shared pass, timed apart from `seconds`
            record.notes.append(f"statistics: {len(asked[id(algo)])} request(s) from the phase's shared pass "
                                f"({passes} pass(es), {stats_seconds:.1f} s, not in this algorithm's seconds)")
        changed = _changed(before, ctx.model)
        record.changes = _change_norms(before, changed, set(ctx.result.quantized))
        pipeline.tensors.update(changed)
        pipeline.modules.update({k: v for k, v in ctx.replaced.items() if replaced_before.get(k) != v})
        if evaluate is not None:
            record.metric_model = "float" if phase == "before_ranges" else "int8"
            with ctx.float_mode() if phase == "before_ranges" else contextlib.nullcontext():
                record.metric_after = _number(evaluate(ctx.model))
        pipeline.records.append(record)


def _number(value) -> float | None:
    return None if value is None else float(value)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    import torch

    out = {}
    for key, value in model.state_dict().items():
        old = before.get(key)
        if old is None or old.shape != value.shape or not torch.equal(old, value):
            out[key] = value.detach().cpu().clone()
    return out


def _change_norms(before: dict, changed: dict, layers: set[str]) -> dict[str, dict[str, float]]:
    """Per layer: the relative L2 change of its weight and bias (a bias created from nothing counts as 1.0)."""
    norms: dict[str, dict[str, float]] = {}
    for key, new in changed.items():
        layer, _, what = key.rpartition(".")
        if layer not in layers or what not in ("weight", "bias"):
            continue
        old = before.get(key)
        if old is None or old.shape != new.shape:
            rel = 1.0
        else:
            old = old.double().cpu()
            rel = float((new.double() - old).norm() / old.norm().clamp(min=1e-12))
        norms.setdefault(layer, {})[what] = round(rel, 6)
    return norms


# ---------------------------------------------------------------------------------------------------------
# ptq_state.pt: save, load (untrusted file), re-apply
# ---------------------------------------------------------------------------------------------------------


class StateError(ValueError):
    """ptq_state.pt does not fit the model: names the key and what was expected."""


def save_state(state: dict[str, Any], path) -> None:
    import torch

    torch.save(state, path)


def load_state(path) -> dict[str, Any]:
    """Read a ptq_state.pt (weights_only: tensors, strings and dicts only) and check its shape."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise StateError(f"it is not a state file torch can read safely ({type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0][:160]})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise StateError(f"field format is not {STATE_FORMAT} (expected a dict with format, tensors, modules)")
    tensors, modules = state.get("tensors"), state.get("modules")
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in tensors.items()):
        raise StateError("field tensors is not a mapping of state_dict key -> tensor")
    if not isinstance(modules, dict) or not all(isinstance(k, str) and v in _module_kinds()
                                                for k, v in modules.items()):
        raise StateError(f"field modules is not a mapping of module name -> one of {sorted(_module_kinds())}")
    return state


def apply_state(model: nn.Module, state: dict[str, Any]) -> None:
    """Re-apply a ptq_state (module swaps first, then the tensors), checking every name and shape against the model;
    a bias the algorithm created on a layer without one is created again."""
    import torch
    from torch import nn

    for name, kind in state["modules"].items():
        try:
            replace_module(model, name, kind)
        except (KeyError, AttributeError):
            raise StateError(f"modules[{name!r}]: the model has no module of that name") from None
    own = model.state_dict()
    for key, value in state["tensors"].items():
        if key not in own:
            layer, _, what = key.rpartition(".")
            module = dict(model.named_modules()).get(layer)
            if what == "bias" and module is not None and getattr(module, "bias", 0) is None:
                module.bias = nn.Parameter(torch.zeros_like(value, device=module.weight.device,
                                                            dtype=module.weight.dtype))
                own = model.state_dict()
            elif module is not None and hasattr(module, "accepts_state_buffer") and module.accepts_state_buffer(what):
                module.register_buffer(what, torch.zeros_like(value))  # a swapped-in module's own state
                own = model.state_dict()
            else:
                raise StateError(f"tensors[{key!r}]: the model has no such parameter or buffer")
        target = own[key]
        if target.shape != value.shape:
            raise StateError(f"tensors[{key!r}]: shape {tuple(value.shape)}, the model's is {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(value.to(target.device, target.dtype))


def read_run_state(run_dir, options) -> dict[str, Any] | None:
    """The ptq_state.pt of a run whose calibrate options ran algorithms (None where they ran none); a StateError
    where it is missing, not a regular file or not a state file."""
    from pathlib import Path

    from ...run_record import RecordError, run_file

    if not getattr(options, "algorithms", None):
        return None
    try:
        path = run_file(Path(run_dir), STATE_FILE)  # a link or a FIFO in its place is refused, never read
    except RecordError as e:
        raise StateError(str(e)) from None
    if path is None:
        raise StateError(f"{STATE_FILE} is missing: the run's calibrate stage ran PTQ algorithms "
                         f"({', '.join(s.name for s in options.algorithms)}) and saved what they changed there")
    return load_state(path)
