"""Losses for fine-tuning: the task loss where labels exist, and distillation from the FP32 teacher.

Distillation needs only images, so a pruned or fake-quantized model can recover on
unlabeled data:
- classifiers: KL between temperature-softened teacher and student logits (Hinton et al.),
  scaled by T^2 so its gradient does not shrink with T;
- detectors: the raw outputs of the head's convolutions (before the decode), by mean
  squared error scaled by the teacher's variance per convolution (`HeadTaps`). Every
  anchor and channel gets a dense signal; the decoded boxes of background anchors, which
  mean nothing, get no weight. Models without a known head fall back to the decoded
  output: boxes by smooth-L1 in units of the input size, scores by binary cross-entropy
  against the teacher's scores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from torch import nn

from ..tasks.detection import ANCHOR_FREE, detect_head_format, detection_heads


def _first(out):
    while isinstance(out, (list, tuple)):
        out = out[0]
    return out


def classification_distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    t = temperature
    return F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), log_target=True, reduction="batchmean") * t * t


def detection_distillation(student: torch.Tensor, teacher: torch.Tensor, num_classes: int, image_size: float) -> torch.Tensor:
    if detect_head_format(teacher, num_classes) == ANCHOR_FREE:
        student, teacher = student.transpose(1, 2), teacher.transpose(1, 2)  # -> (B, N, 4 + C)
    box = F.smooth_l1_loss(student[..., :4] / image_size, teacher[..., :4] / image_size, beta=0.01)
    s, t = student[..., 4:].float().clamp(1e-6, 1 - 1e-6), teacher[..., 4:].float().clamp(0, 1)
    scores = F.binary_cross_entropy(s, t)
    return box + scores


def distillation_loss(task: str, student_out, teacher_out, temperature: float = 4.0, num_classes: int | None = None,
                      image_size: float = 640.0) -> torch.Tensor:
    student, teacher = _first(student_out), _first(teacher_out).detach()
    if task == "classification":
        return classification_distillation(student.float(), teacher.float(), temperature)
    return detection_distillation(student.float(), teacher.float(), num_classes, image_size)


class HeadTaps:
    """Keeps the output of every convolution inside a detector's head on each forward (empty: no known head).

    Structured pruning leaves the head's output channels alone, so a pruned student's taps
    line up with the unpruned teacher's, name for name.
    """

    def __init__(self, model: nn.Module):
        self.outputs: dict[str, torch.Tensor] = {}
        heads = {id(h) for h in detection_heads(model)}
        convs = [(f"{name}.{n}", m) for name, head in model.named_modules() if id(head) in heads
                 for n, m in head.named_modules() if isinstance(m, nn.Conv2d)]
        self.handles = [m.register_forward_hook(self._keep(name)) for name, m in convs]

    def _keep(self, name: str):
        def hook(module, inputs, output):
            self.outputs[name] = output

        return hook

    def __bool__(self) -> bool:
        return bool(self.handles)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def head_distillation(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> torch.Tensor:
    losses = [F.mse_loss(student[k].float(), teacher[k].float()) / (teacher[k].float().var() + 1e-6) for k in teacher]
    return torch.stack(losses).mean()
