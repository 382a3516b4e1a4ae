"""Cross-layer equalization with high-bias absorption (DFQ, Nagel et al. 2019), a before-ranges PTQ algorithm.

For a chain conv A -> activation f -> conv B in which A's output reaches only f and f's output only B, scaling
A's output channel i by 1/s_i and B's input channel i by s_i keeps the float function wherever f(x / s) = f(x) / s
for s > 0 (f positively homogeneous). Choosing s_i = sqrt(r1_i * r2_i) / r2_i, with r1_i the range of A's output
channel i and r2_i that of B's input channel i, makes both ranges sqrt(r1_i * r2_i): the weights of both layers
become equally easy to quantize per tensor. Chains that share a layer (conv -> depthwise -> conv) are equalized
pair by pair, sweeping until no scale moves by more than `tolerance`.

Activations:
- ReLU, LeakyReLU, PReLU and none (Identity) are positively homogeneous: equalized exactly.
- ReLU6 clips at 6, which scaling would move to 6 / s_i. `relu6: clip` (the default) equalizes those chains
  exactly: the ReLU6 module becomes a ChannelClip (channel_clip.py) whose bound moves with each channel's scale,
  one set of bounds per call of the module. `relu6: skip` leaves the chains alone. Like DFQ's MobileNetV2
  experiments and AIMET (which replaces ReLU6 by ReLU before CLE), `relu6: replace` swaps each ReLU6 module of an
  equalized chain for a ReLU (every use of that module), a declared change of the float function whose size on
  the check images is recorded in the notes. Measured on EfficientNet-Lite0 it is no small change: CLE with the
  swap plus full bias correction scored 34.7 top-1 against FP32's 88.6 (docs/BENCHMARKS.md). A functional relu6
  can be neither clipped per channel nor swapped: its chain is skipped.
- SiLU/Swish, Hardswish, GELU, sigmoid, tanh and other activations are not positively homogeneous
  (SiLU(x / s) != SiLU(x) / s): their chains are skipped and recorded as skipped with that reason.

High-bias absorption (after equalization, chains with ReLU, the swapped ReLU6 included): where a channel of A's
output never falls below h_i > 0 on the calibration data (its minimum, measured in float before the algorithm
and followed through the scaling), ReLU(x - h_i) = ReLU(x) - h_i there, so h_i moves from A's bias into B's bias
(b_B += W_B h). That is exact on the calibration data, and only where B has no padding (a padded border sees 0,
not -h), so it is done for unpadded B fed directly by the activation only. (DFQ takes h from the BatchNorm
statistics as beta - 3 gamma; the BatchNorms are folded before this slot, and the data's minimum keeps the float
function on the calibration images exactly.)

Chains are found on the traced graph (torch.fx, convolutions, activations and quantizers as leaves); a model fx
cannot trace (a detector's head) is read from its modules' forward hooks, which see module activations only. Every
change is proved on the check images to keep the float function (models/equivalence.checked_rewrite, the ReLU6
swap excepted and measured): a wrong equalization is refused, never applied.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pydantic import Field

from .base import Algorithm, AlgorithmOptions, AlgorithmRecord, StatisticRequest, register_algorithm

# Activations that commute with a positive per-channel scale, and those that do not (by kind name).
HOMOGENEOUS = ("relu", "leaky_relu", "prelu", "identity")
NOT_HOMOGENEOUS = ("silu", "hardswish", "gelu", "sigmoid", "tanh", "mish", "elu", "softplus", "hardsigmoid", "swish",
                   "hardtanh")


class CLEOptions(AlgorithmOptions):
    # clip by default (exact): replacing ReLU6 by ReLU (DFQ, AIMET) took EfficientNet-Lite0 from 88.6 to 34.7
    # top-1 with CLE and full bias correction (docs/BENCHMARKS.md, issue 25): its activations exceed 6, so the
    # swap is no small change there. `replace` stays for models trained to tolerate it.
    relu6: Literal["clip", "replace", "skip"] = Field(
        "clip", description="ReLU6 in a chain: equalize it exactly with a per-channel clip bound (clip), skip the "
                            "chain, or replace ReLU6 by ReLU and equalize (DFQ, AIMET; changes the float function "
                            "where activations exceed 6).")
    high_bias_absorption: bool = Field(True, description="Absorb high biases into the next layer after equalizing.")
    max_sweeps: int = Field(100, ge=1, le=10_000, description="Most equalization sweeps over all chains.")
    tolerance: float = Field(1e-4, gt=0, le=1.0, description="Stop when no channel scale moves by more than this "
                                                             "(relative).")


@dataclass
class Chain:
    """conv `first` -> activation -> conv `second` (names of modules), as found on the graph."""

    first: str
    second: str
    kind: str  # the activation: a HOMOGENEOUS / NOT_HOMOGENEOUS kind, or "relu6"
    act_module: str | None  # the activation's module, None for a function
    direct: bool  # the activation's output goes straight into `second` (no pooling or padding between)
    act_call: int = 0  # which call of act_module in one forward (a module may be applied several times)

    @property
    def label(self) -> str:
        return f"{self.first} -> {self.second}"


@dataclass
class Found:
    chains: list[Chain] = field(default_factory=list)
    traced_by: str = "torch.fx"
    calls: dict[str, int] = field(default_factory=dict)  # activation module -> its calls in one forward


@register_algorithm("cle")
class CrossLayerEqualization(Algorithm):
    Options = CLEOptions
    phase = "before_ranges"

    def __init__(self) -> None:
        self._found: Found | None = None

    def _chains(self, ctx) -> Found:
        if self._found is None:
            self._found = find_chains(ctx.model, ctx.example_input)
        return self._found

    def statistics(self, ctx, opts: CLEOptions) -> list[StatisticRequest]:
        if not opts.high_bias_absorption:
            return []
        return [StatisticRequest(c.first, "output") for c in self._chains(ctx).chains
                if c.kind in ("relu", "relu6") and c.direct]

    def apply(self, ctx, opts: CLEOptions, stats) -> AlgorithmRecord:
        from ...models.equivalence import checked_rewrite

        found = self._chains(ctx)
        record = AlgorithmRecord(self.name, notes=[f"chains found on the graph traced by {found.traced_by}"])
        chosen = []
        for chain in found.chains:
            if chain.kind in NOT_HOMOGENEOUS:
                record.skipped[chain.label] = (f"its activation ({chain.kind}) is not positively homogeneous "
                                               "(f(x/s) != f(x)/s), so scaling channels would change the function")
            elif chain.kind == "relu6" and opts.relu6 == "skip":
                record.skipped[chain.label] = "ReLU6 clips at 6, which scaling would move (relu6: skip)"
            elif chain.kind == "relu6" and chain.act_module is None:
                record.skipped[chain.label] = ("a functional relu6 can be neither clipped per channel nor replaced "
                                               "by ReLU (only a ReLU6 module)")
            elif chain.kind == "channel_clip":
                record.skipped[chain.label] = "its activation is already a per-channel clip (equalized before)"
            else:
                chosen.append(chain)
        if not chosen:
            record.skipped.setdefault("model", "no conv -> ReLU-like activation -> conv chain in which each "
                                               "output feeds only the next (nothing to equalize)")
            return record
        clipped = sorted({c.act_module for c in chosen if c.kind == "relu6"}) if opts.relu6 == "clip" else []
        swaps = sorted({c.act_module for c in chosen if c.kind == "relu6"}) if opts.relu6 == "replace" else []
        if swaps:
            change = _swap_relu6(ctx, swaps)
            record.notes.append(f"replaced {len(swaps)} ReLU6 module(s) by ReLU (every use of each): the float "
                                f"output moved by {change:.2e} relative on the check images")
        scales: dict[str, object] = {}

        def equalize(model) -> dict:
            _clip_relu6(model, clipped, found.calls)  # with their parents' reset hooks: the proof runs them too
            done = _equalize(model, chosen, opts, scales)
            _move_bounds(model, [c for c in chosen if c.act_module in clipped], scales)
            return done

        advice = "Remove cle from stages.calibrate.algorithms (and report the model: its chain was misread)."
        sweeps = checked_rewrite(ctx.model, equalize, ctx.example_input, what="cle (cross-layer equalization)",
                                 advice=advice)
        record.notes.append(f"equalized {len(chosen)} chain(s) in {sweeps['sweeps']} sweep(s) (largest last scale "
                            f"step {sweeps['last_step']:.1e})")
        for name in clipped:  # swapped inside the checked rewrite: recorded once it was accepted
            ctx.replaced[name] = "ChannelClip"
        if clipped:
            record.notes.append(f"{len(clipped)} ReLU6 module(s) became per-channel clips (ChannelClip), exactly")
        if opts.high_bias_absorption:
            absorbed, skipped = {}, {}

            def absorb(model) -> dict:
                return _absorb(model, chosen, stats, scales, absorbed, skipped)

            checked_rewrite(ctx.model, absorb, ctx.example_input, what="cle high-bias absorption", advice=advice)
            record.skipped.update({f"absorb {k}": v for k, v in skipped.items()})
            if absorbed:
                record.notes.append(f"absorbed high biases of {len(absorbed)} chain(s), "
                                    f"{sum(absorbed.values())} channel(s)")
        return record


# ---------------------------------------------------------------------------------------------------------
# Finding chains
# ---------------------------------------------------------------------------------------------------------


def _activation_kind_of_module(module) -> str | None:
    from torch import nn

    from .channel_clip import ChannelClip

    if isinstance(module, ChannelClip):
        return "channel_clip"
    table = [(nn.ReLU, "relu"), (nn.ReLU6, "relu6"), (nn.LeakyReLU, "leaky_relu"), (nn.PReLU, "prelu"),
             (nn.SiLU, "silu"), (nn.Hardswish, "hardswish"), (nn.GELU, "gelu"), (nn.Sigmoid, "sigmoid"),
             (nn.Tanh, "tanh"), (nn.Mish, "mish"), (nn.ELU, "elu"), (nn.Softplus, "softplus"),
             (nn.Hardsigmoid, "hardsigmoid")]
    for cls, kind in table:
        if type(module) is cls:
            return kind
    if type(module) is nn.Hardtanh:
        return "relu6" if (module.min_val, module.max_val) == (0.0, 6.0) else "hardtanh"
    name = type(module).__name__.lower()
    if "swish" in name or "silu" in name:  # efficientnet's (MemoryEfficient)Swish, custom SiLU classes
        return "swish"
    if "hardswish" in name or "hswish" in name:
        return "hardswish"
    return None


def _activation_kind_of_function(target, args, kwargs) -> str | None:
    import torch
    import torch.nn.functional as F

    if target in (F.relu, torch.relu, torch.relu_) or target in ("relu", "relu_"):
        return "relu"
    if target is F.relu6:
        return "relu6"
    if target is F.hardtanh:
        lo = kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)
        hi = kwargs.get("max_val", args[2] if len(args) > 2 else 1.0)
        return "relu6" if (lo, hi) == (0.0, 6.0) else "hardtanh"
    if target is F.leaky_relu:
        return "leaky_relu"
    names = {F.silu: "silu", F.hardswish: "hardswish", F.gelu: "gelu", torch.sigmoid: "sigmoid",
             torch.tanh: "tanh", F.mish: "mish", F.elu: "elu", F.softplus: "softplus", "sigmoid": "sigmoid",
             "tanh": "tanh"}
    try:
        return names.get(target)
    except TypeError:
        return None


def _is_conv(module) -> bool:
    from torch import nn

    return isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))


def _passthrough_module(module) -> str | None:
    """'same' for modules that hand the tensor on unchanged in eval (Identity: a folded BatchNorm; Dropout),
    'channelwise' for those that commute with a positive per-channel scale but change where values are (pooling,
    zero padding); None otherwise."""
    from torch import nn

    if isinstance(module, (nn.Identity, nn.Dropout, nn.Dropout2d, nn.Dropout3d)):
        return "same"
    pools = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
             nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool2d, nn.ZeroPad2d)
    return "channelwise" if isinstance(module, pools) else None


def find_chains(model, example) -> Found:
    """Every conv -> activation -> conv chain whose tensors each have one reader (see the module docstring)."""
    try:
        chains, calls = _chains_fx(model)
        return Found(chains, "torch.fx", calls)
    except Exception:  # fx cannot trace it (data-dependent control flow in a detector head, say): module hooks
        chains, calls = _chains_hooks(model, example)
        return Found(chains, "module forward hooks (fx could not trace the model)", calls)


def _leaf_tracer():
    import torch.fx
    from torch import nn

    try:
        from modelopt.torch.quantization.nn import TensorQuantizer
    except ImportError:  # pragma: no cover - modelopt is a dependency
        TensorQuantizer = ()

    class LeafTracer(torch.fx.Tracer):
        def is_leaf_module(self, m, qualname) -> bool:
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.modules.batchnorm._BatchNorm)) or (
                    TensorQuantizer and isinstance(m, TensorQuantizer)):
                return True
            if _activation_kind_of_module(m) is not None or _passthrough_module(m) is not None:
                return True
            return super().is_leaf_module(m, qualname)

    return LeafTracer()


def _chains_fx(model) -> tuple[list[Chain], dict[str, int]]:
    graph = _leaf_tracer().trace(model)
    modules = dict(model.named_modules())
    call_of: dict = {}  # an activation module's node -> which call of that module it is (graph order is run order)
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module" and _activation_kind_of_module(modules[node.target]) is not None:
            call_of[node] = calls.get(node.target, 0)
            calls[node.target] = call_of[node] + 1

    def module_of(node):
        return modules.get(node.target) if node.op == "call_module" else None

    def only_user(node):
        users = list(node.users)
        return users[0] if len(users) == 1 else None

    def activation(node) -> tuple[str | None, str | None]:
        if node.op == "call_module":
            return _activation_kind_of_module(modules[node.target]), node.target
        if node.op in ("call_function", "call_method"):
            return _activation_kind_of_function(node.target, node.args, node.kwargs), None
        return None, None

    chains = []
    for node in graph.nodes:
        first = module_of(node)
        if first is None or not _is_conv(first):
            continue
        nxt = only_user(node)
        while nxt is not None and module_of(nxt) is not None and _passthrough_module(module_of(nxt)) == "same":
            nxt = only_user(nxt)
        if nxt is None:
            continue
        kind, act_module = activation(nxt)
        if kind is None:
            continue
        cur, direct = only_user(nxt), True
        while cur is not None and module_of(cur) is not None and _passthrough_module(module_of(cur)) is not None:
            direct = direct and _passthrough_module(module_of(cur)) == "same"
            cur = only_user(cur)
        second = module_of(cur) if cur is not None else None
        if second is None or not _is_conv(second) or second.in_channels != first.out_channels \
                or second.weight.dim() != first.weight.dim():
            continue
        chains.append(Chain(node.target, cur.target, kind, act_module, direct, call_of.get(nxt, 0)))
    return chains, calls


def _chains_hooks(model, example) -> tuple[list[Chain], dict[str, int]]:
    """Chains from the modules' forward hooks: a tensor made by one module and read by exactly one other. Functions
    are invisible here, so a chain read by one is caught by the check of the rewrite, not here."""
    import torch

    made_by: dict[int, str] = {}
    readers: dict[int, list[str]] = {}
    outputs: dict[str, int] = {}
    calls: dict[str, int] = {}  # a module run twice (a shared activation) has no single reader to follow
    alive = []
    modules = dict(model.named_modules())

    def hook(name):
        def fn(module, args, output):
            for t in args:
                if isinstance(t, torch.Tensor):
                    readers.setdefault(id(t), []).append(name)
                    alive.append(t)
            if isinstance(output, torch.Tensor):
                made_by[id(output)] = name
                outputs[name] = id(output)
                calls[name] = calls.get(name, 0) + 1
                alive.append(output)

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()
               if n and (_is_conv(m) or _activation_kind_of_module(m) is not None or _passthrough_module(m))]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()

    def only_reader(name):
        if calls.get(name, 0) != 1:
            return None
        # Identity hands back the very tensor it read: that tensor's readers include the Identity, whose readers
        # are then the tensor's own. A module that returned what it read is skipped, not counted as a reader.
        tensor = outputs.get(name, -1)
        found = [r for r in readers.get(tensor, []) if r != name and outputs.get(r) != tensor]
        return found[0] if len(found) == 1 else None

    chains = []
    for name, module in modules.items():
        if not _is_conv(module) or name not in outputs:
            continue
        nxt = only_reader(name)
        while nxt is not None and _passthrough_module(modules[nxt]) == "same":
            nxt = only_reader(nxt)
        if nxt is None or (kind := _activation_kind_of_module(modules[nxt])) is None:
            continue
        cur, direct = only_reader(nxt), True
        while cur is not None and _passthrough_module(modules[cur]) is not None:
            direct = direct and _passthrough_module(modules[cur]) == "same"
            cur = only_reader(cur)
        if cur is None or not _is_conv(modules[cur]) or modules[cur].in_channels != module.out_channels:
            continue
        chains.append(Chain(name, cur, kind, nxt, direct))  # an activation called once: call 0
    return chains, {name: n for name, n in calls.items() if _activation_kind_of_module(modules[name]) is not None}


# ---------------------------------------------------------------------------------------------------------
# The rewrites
# ---------------------------------------------------------------------------------------------------------


def _swap_relu6(ctx, names: list[str]) -> float:
    """Replace these ReLU6 modules by ReLU; the float output's relative change on the check images."""
    import torch

    from ...models.equivalence import difference

    with torch.no_grad():
        before = ctx.model(ctx.example_input)
        for name in names:
            ctx.replace_module(name, "ReLU")
        after = ctx.model(ctx.example_input)
    found = difference(before, after)
    return float("inf") if found is None else found[0] / max(found[1], 1e-12)


def _clip_relu6(model, names: list[str], calls: dict[str, int]) -> None:
    """Swap each ReLU6 module for a ChannelClip computing the same (a scalar bound 6 for each of its calls)."""
    from .channel_clip import ChannelClip

    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        clip = ChannelClip(calls.get(name, 1), bound=6.0)
        setattr(parent, child, clip)
        clip.attach(parent)


def _move_bounds(model, chains: list[Chain], scales: dict) -> None:
    """Each clipped chain's bound, 6 on the original scale, follows its channels: 6 times the factor the first
    convolution's output channels were multiplied by."""
    modules = dict(model.named_modules())
    for chain in chains:
        first = modules[chain.first]
        factor = scales.get(chain.first)
        if factor is not None:
            modules[chain.act_module].set_bound(chain.act_call, (6.0 * factor).to(first.weight.dtype),
                                                spatial_dims=first.weight.dim() - 2)


def _out_ranges(conv):
    w = conv.weight.detach()
    return w.abs().reshape(w.shape[0], -1).amax(1)


def _grouped(conv):
    """conv.weight viewed as (groups, out per group, in per group, kernel elements)."""
    w = conv.weight.data
    g = conv.groups
    return w.view(g, w.shape[0] // g, w.shape[1], -1)


def _in_ranges(conv):
    wg = _grouped(conv).abs()
    return wg.amax(dim=(1, 3)).reshape(-1)  # (groups * in per group) = in_channels, in channel order


def _scale_out_(conv, factor) -> None:
    """Multiply output channel i of conv by factor[i] (weight and bias)."""
    conv.weight.data.mul_(factor.view(-1, *[1] * (conv.weight.dim() - 1)))
    if conv.bias is not None:
        conv.bias.data.mul_(factor)


def _scale_in_(conv, factor) -> None:
    """Multiply input channel i of conv by factor[i]."""
    _grouped(conv).mul_(factor.view(conv.groups, 1, -1, 1))


def _equalize(model, chains: list[Chain], opts: CLEOptions, scales: dict) -> dict:
    """Sweep over the chains until no scale moves by more than opts.tolerance; `scales[first]` gathers the factor
    each first layer's output channels were multiplied by (for the absorption's statistics)."""
    import torch

    modules = dict(model.named_modules())
    last = 0.0
    sweep = 0
    with torch.no_grad():
        for sweep in range(1, opts.max_sweeps + 1):
            last = 0.0
            for chain in chains:
                first, second = modules[chain.first], modules[chain.second]
                r1, r2 = _out_ranges(first).double(), _in_ranges(second).double()
                ok = (r1 > 0) & (r2 > 0)
                s = torch.where(ok, torch.sqrt(r1 / r2.clamp(min=1e-30)), torch.ones_like(r1))
                _scale_out_(first, (1 / s).to(first.weight.dtype))
                _scale_in_(second, s.to(second.weight.dtype))
                scales[chain.first] = scales.get(chain.first, torch.ones_like(s)) / s
                last = max(last, float((s - 1).abs().max()))
            if last <= opts.tolerance:
                break
    return {"sweeps": sweep, "last_step": last}


def _pads(conv) -> bool:
    from torch import nn

    if isinstance(conv.padding, str):
        return conv.padding != "valid"
    if any(conv.padding):
        return True
    extra = getattr(conv, "static_padding", None)  # EfficientNet's Conv2dStaticSamePadding pads in its forward
    # (efficientnet_pytorch and its lite fork define an Identity class of their own for "no padding")
    if extra is None or isinstance(extra, nn.Identity) or type(extra).__name__ == "Identity":
        return False
    padding = getattr(extra, "padding", None)  # a ZeroPad2d((0, 0, 0, 0)) of a 1x1 convolution pads nothing
    return not (isinstance(padding, (tuple, list)) and not any(padding))


def _absorb(model, chains: list[Chain], stats, scales: dict, absorbed: dict, skipped: dict) -> dict:
    import torch
    from torch import nn

    from .channel_clip import ChannelClip

    modules = dict(model.named_modules())
    with torch.no_grad():
        for chain in chains:
            if chain.kind not in ("relu", "relu6"):
                continue
            first, second = modules[chain.first], modules[chain.second]
            request = StatisticRequest(chain.first, "output")
            if request not in stats:
                continue
            if not chain.direct or _pads(second):
                skipped[chain.label] = f"{chain.second} pads its input (or pooling sits between): absorption " \
                                       "would change its border"
                continue
            if first.bias is None:
                skipped[chain.label] = f"{chain.first} has no bias to absorb"
                continue
            low = stats[request].min.to(first.bias.device) * scales.get(chain.first, 1.0)
            h = low.clamp(min=0).to(first.bias.dtype)
            clip = modules[chain.act_module] if chain.act_module else None
            bound = None
            if isinstance(clip, ChannelClip):  # min(x, c) - h = min(x - h, c - h) where x >= h: the bound moves too
                bound = clip.bound(chain.act_call).reshape(-1).expand_as(h)
                # at most 0.999 of the bound: an emptied bound would divide by ~0 in the export (NaN in FP16)
                h = torch.minimum(h, 0.999 * bound)
            if not bool((h > 0).any()):
                continue
            first.bias.sub_(h)
            if bound is not None:
                clip.set_bound(chain.act_call, bound - h, spatial_dims=first.weight.dim() - 2)
            out, in_per_group = second.weight.shape[0], second.weight.shape[1]
            g = second.groups
            w_sum = second.weight.reshape(out, in_per_group, -1).sum(-1)  # (out, in per group)
            h_groups = h.view(g, in_per_group).repeat_interleave(out // g, dim=0)  # (out, in per group)
            shift = (w_sum * h_groups).sum(1)
            if second.bias is None:
                second.bias = nn.Parameter(torch.zeros(out, dtype=second.weight.dtype, device=second.weight.device))
            second.bias.add_(shift)
            absorbed[chain.label] = int((h > 0).sum())
    return absorbed
