"""Does the residual_add rewrite keep the float function on ResNets this project never saw (issue 24, item 5)?

    python benchmarks/rewrite_check.py [--size 64] [--images 4]

For torchvision's resnet18 and timm's resnet18 (SiLU, GELU), seresnet18 and ecaresnet26t, built without weights
(their own initialisation, then every BatchNorm given random statistics and affine terms as training would leave
them: timm zero-initialises each block's last BatchNorm, which would hide a dropped branch), in eval mode, runs
`quantize_` (BatchNorm folding, the residual_add rule, max calibration on the same random images) and reports, with
every quantizer off, the largest difference between the rewritten model's outputs and the original's, and the
residual Adds quantized or left alone. The "old rule" columns are the BasicBlock-only rewrite (timm blocks given
torchvision's forward) on the same model: unchecked as it shipped (the silent change), and under the block proof
(what the proof does with a rewrite that does not fit: leaves the block alone).
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from workbench.quant import rules  # noqa: E402
from workbench.quant.ptq import Int8Config, quantize_  # noqa: E402


def models():
    import timm

    yield "torchvision resnet18", lambda: torchvision.models.resnet18()
    yield "timm resnet18, act_layer=silu", lambda: timm.create_model("resnet18", act_layer="silu")
    yield "timm resnet18, act_layer=gelu", lambda: timm.create_model("resnet18", act_layer="gelu")
    yield "timm seresnet18", lambda: timm.create_model("seresnet18")
    yield "timm ecaresnet26t", lambda: timm.create_model("ecaresnet26t")


def trained_like(model: torch.nn.Module) -> torch.nn.Module:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.uniform_(0.5, 1.5, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def old_rule(model: torch.nn.Module, x: torch.Tensor, reference: torch.Tensor, proved: bool) -> tuple[float, int]:
    """The old rewrite (every block with conv1/bn1/conv2/bn2 given torchvision's forward), unchecked as it was or under
    today's block proof: the output difference, quantizers off, and how many blocks the proof left alone."""
    saved = rules._TIMM_BLOCK, rules.difference
    rules._TIMM_BLOCK = ("no such attribute",)  # timm blocks fall through to torchvision's forward, as before
    if not proved:
        rules.difference = lambda before, after: (0.0, 1.0)
    try:
        rewrite = rules.insert_residual_quantizers(model, x)
        with torch.no_grad(), rules.quantizers_off(model):
            return float((model(x) - reference).abs().max()), len(rewrite.left_alone)
    finally:
        rules._TIMM_BLOCK, rules.difference = saved


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--images", type=int, default=4)
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    x = torch.randn(args.images, 3, args.size, args.size)
    print(f"{args.images} random images at {args.size} px, CPU {torch.get_num_threads()} threads\n")
    print("| model | max abs output difference, quantizers off | max abs output | residual Adds int8 / left float "
          "| old rule unchecked: difference | old rule under the block proof: blocks left alone, difference |")
    print("|---|---|---|---|---|---|")
    for name, build in models():
        torch.manual_seed(0)
        model = trained_like(build())
        with torch.no_grad():
            reference = model(x)
        old, _ = old_rule(copy.deepcopy(model), x, reference, proved=False)
        proved, left_alone = old_rule(copy.deepcopy(model), x, reference, proved=True)
        result = quantize_(model, Int8Config(method="max"), lambda m: m(x), x)
        with torch.no_grad(), rules.quantizers_off(model):
            diff = float((model(x) - reference).abs().max())
        adds = result.census().get("Add (residual)", {"int8": 0, "float": 0})
        left = f" ({len(result.residual_left_alone)} not recognised)" if result.residual_left_alone else ""
        print(f"| {name} | {diff:.2e} | {float(reference.abs().max()):.3g} | {adds['int8']} / {adds['float']}{left} "
              f"| {old:.3g} | {left_alone}, {proved:.2g} |")


if __name__ == "__main__":
    main()
