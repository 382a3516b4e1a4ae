"""Losses for fine-tuning: the task loss where labels exist, and distillation from the FP32 teacher.

Distillation needs only images, so a pruned or fake-quantized model can recover on
unlabeled data:
- classifiers: KL between temperature-softened teacher and student logits (Hinton et al.),
  scaled by T^2 so its gradient does not shrink with T;
- detectors: the decoded head output (boxes, objectness, class scores): boxes by a
  smooth-L1 in units of the input size, scores by binary cross-entropy against the
  teacher's scores as soft targets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..tasks.detection import ANCHOR_FREE, detect_head_format


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
