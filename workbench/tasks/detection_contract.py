"""The detector contract: what a detector's forward returns, as a recipe declares it (`model.detector`).

The scorer (tasks/detection.py) reads one form: boxes cx, cy, w, h in input pixels and scores that
are probabilities, in one of two layouts, (B, N, 5 + C) with objectness or (B, 4 + C, N) without.
A model that returns another form of the same information (xyxy boxes, boxes in 0..1 of the input,
logits) declares it, and `attach_contract` puts the conversion on the model's output as a forward
hook: every reader (evaluation, agreement, the exported graph and its metadata) then sees the one
form, and the conversion, like the model's own decode, is traced as float arithmetic after the head.
A declared layout is checked on every forward: an output that reads as the other layout, or as
none, is refused naming `model.detector.layout`.
"""

from __future__ import annotations

import torch
from torch import nn

from .detection import ANCHOR_FREE, ANCHOR_OBJECTNESS, UnknownHeadError

FIELD = "model.detector"


class DetectorContract:
    """A forward hook giving the model's first output the scorer's form (a picklable object: a saved model keeps
    it)."""

    def __init__(self, layout: str | None, boxes: str, units: str, scores: str):
        self.layout, self.boxes, self.units, self.scores = layout, boxes, units, scores

    def __call__(self, module: nn.Module, inputs, output):
        if isinstance(output, (tuple, list)):
            first = self.convert(output[0], inputs[0])
            return type(output)([first, *output[1:]]) if isinstance(output, tuple) else [first, *output[1:]]
        return self.convert(output, inputs[0])

    def convert(self, y: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        check_layout(tuple(y.shape), self.layout)
        if self.boxes == "cxcywh" and self.units == "pixels" and self.scores == "probabilities":
            return y
        # Work on (B, N, channels): the anchor-free layout is transposed in and back out.
        layout = self.layout or (ANCHOR_OBJECTNESS if y.shape[1] > y.shape[2] else ANCHOR_FREE)  # boxes outnumber
        rows = y.transpose(1, 2) if layout == ANCHOR_FREE else y
        box, score = rows[..., :4], rows[..., 4:]
        if self.boxes == "xyxy":
            box = torch.cat([(box[..., :2] + box[..., 2:]) / 2, box[..., 2:] - box[..., :2]], dim=-1)
        if self.units == "normalized":  # fractions of the input's width and height
            # x and y channels scaled by the traced sizes (a torch.tensor of Python ints would export as a constant
            # and scale every other size of a dynamic-size graph by the export's)
            w, h = image.shape[-1], image.shape[-2]
            box = torch.stack([box[..., 0] * w, box[..., 1] * h, box[..., 2] * w, box[..., 3] * h], dim=-1)
        if self.scores == "logits":
            score = score.sigmoid()
        rows = torch.cat([box, score], dim=-1)
        return rows.transpose(1, 2) if layout == ANCHOR_FREE else rows


def check_layout(shape: tuple[int, ...], layout: str | None) -> None:
    """Refuse an output the declared layout cannot read: it must be 3-D, hold its box and score channels, and have
    more boxes than channels (every real head), else it reads as the other layout."""
    if layout is None:
        return
    if len(shape) != 3:
        raise UnknownHeadError(f"{FIELD}.layout: declared {layout}, but the model returns an output of shape {shape}, "
                               "not 3-D (batch, boxes, channels) or (batch, channels, boxes); decode the head's maps "
                               "in forward (README: the detector contract)")
    channels, boxes = (shape[2], shape[1]) if layout == ANCHOR_OBJECTNESS else (shape[1], shape[2])
    need = 6 if layout == ANCHOR_OBJECTNESS else 5
    other = ANCHOR_FREE if layout == ANCHOR_OBJECTNESS else ANCHOR_OBJECTNESS
    form = "(batch, boxes, 5 + classes)" if layout == ANCHOR_OBJECTNESS else "(batch, 4 + classes, boxes)"
    if channels < need or boxes <= channels:
        raise UnknownHeadError(
            f"{FIELD}.layout: declared {layout} {form}, but the model returns {shape}, which reads as {other}; "
            f"set layout: {other} or make the model's forward return {form}")


def attach_contract(model: nn.Module, contract) -> nn.Module:
    """Declare the model's output form (`contract`: the recipe's model.detector) on the model: the layout for the
    readers that guess it, the conversion hook when the form is not the scorer's."""
    model.detector_layout = contract.layout
    model.register_forward_hook(DetectorContract(contract.layout, contract.boxes, contract.units, contract.scores))
    return model
