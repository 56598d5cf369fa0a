"""Knowledge distillation (Hinton et al. 2015) as a training option.

loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, y).
The T^2 factor keeps the soft term's gradients on the scale of the hard term's (Hinton et al., 2.1).
The teacher runs in eval mode without gradients on the same (augmented) batch as the student.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, y: torch.Tensor, temperature: float,
            alpha: float) -> torch.Tensor:
    t = temperature
    soft = F.kl_div(F.log_softmax(student_logits / t, 1), F.log_softmax(teacher_logits / t, 1),
                    reduction="batchmean", log_target=True) * (t * t)
    return alpha * soft + (1 - alpha) * F.cross_entropy(student_logits, y)


def distillation(teacher: nn.Module, temperature: float = 4.0, alpha: float = 0.9) -> Callable:
    """A Trainer loss_fn(out, x, y) that distils `teacher` into the model being trained."""
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    def loss_fn(out: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = teacher(x).float()
        return kd_loss(out, target, y, temperature, alpha)

    return loss_fn
