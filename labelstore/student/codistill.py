"""Dense and online losses: the dense KL against full teacher logits, and co-distillation (teacher and student
trained together, the student matching the teacher's current distribution plus the ground truth)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from labelstore.constants import IGNORE_INDEX
from labelstore.student.loss_terms import _as_rows, _cdt, _check_reduction, _check_temperature, _reduce_rows


def dense_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Forward KL(softmax(teacher / T) || softmax(student / T)) * T^2 from dense logits [..., V].

    Gradients flow into whichever logits require them; detach the teacher yourself when it must not learn.
    """
    _check_reduction(reduction)
    _check_temperature(temperature)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher and student logits must have the same shape, got {tuple(teacher_logits.shape)} "
            f"and {tuple(student_logits.shape)}"
        )
    s2d, lead = _as_rows(student_logits)
    t2d = teacher_logits.reshape(s2d.shape)
    log_p = F.log_softmax(t2d.to(_cdt(s2d)) / temperature, dim=-1)
    log_q = F.log_softmax(s2d.to(_cdt(s2d)) / temperature, dim=-1)
    per_row = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    return _reduce_rows(per_row, mask, lead, s2d.device, reduction, temperature)


class CodistillationLosses(NamedTuple):
    """Losses of one co-distillation step. ``total = teacher + student`` is safe to backpropagate through
    in one call: the student's part sees a detached teacher."""

    total: torch.Tensor
    teacher: torch.Tensor
    student: torch.Tensor
    student_kl: torch.Tensor
    student_ce: torch.Tensor


def codistillation_losses(
    *args,
    student_logits: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    alpha: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
) -> CodistillationLosses:
    """Online co-distillation: teacher and student train together, no store.

    - teacher: ``CE(teacher, labels)``;
    - student: ``alpha * T^2 KL(softmax(teacher.detach() / T) || softmax(student / T))
      + (1 - alpha) CE(student, labels)``; the KL sees a detached teacher, so the student's loss never
      sends gradient to the teacher.

    Arguments are keyword-only (``student_logits=, teacher_logits=, labels=``): the other losses take the
    student's logits first, this one took the teacher's first until 0.2, and both have the same shape, so a
    positional call could swap the two roles without an error. Positional calls are refused.

    Both are means over positions whose label is not ``ignore_index``. ``student_kl``/``student_ce`` are
    detached, for logging.
    """
    if args or student_logits is None or teacher_logits is None or labels is None:
        raise TypeError("codistillation_losses takes keyword arguments only: codistillation_losses("
                        "student_logits=..., teacher_logits=..., labels=...) (until 0.2 the first positional "
                        "argument was the teacher's logits; the keywords make the roles explicit)")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    valid = labels != ignore_index
    from labelstore.student.losses import label_ce  # (losses re-exports this module's names)

    teacher = label_ce(teacher_logits, labels, ignore_index=ignore_index)
    kl = dense_kl(student_logits, teacher_logits.detach(), valid, temperature=temperature)
    ce = label_ce(student_logits, labels, ignore_index=ignore_index)
    student = alpha * kl + (1.0 - alpha) * ce
    return CodistillationLosses(teacher + student, teacher, student, kl.detach(), ce.detach())


def _logits_of(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits


class CoDistillation(nn.Module):
    """Teacher and student trained together: ``forward`` runs both and returns ``CodistillationLosses``.

    ``losses.total.backward()`` then one optimizer over both models' parameters trains the teacher on the
    labels and the student on labels plus the teacher's (detached) predictions. Models may return logits or
    an object with ``.logits`` (Hugging Face).
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, alpha: float = 0.5, temperature: float = 1.0):
        super().__init__()
        self.teacher, self.student = teacher, student
        self.alpha, self.temperature = alpha, temperature

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, **model_kwargs) -> CodistillationLosses:
        teacher_logits = _logits_of(self.teacher(input_ids, **model_kwargs))
        student_logits = _logits_of(self.student(input_ids, **model_kwargs))
        return codistillation_losses(
            student_logits=student_logits, teacher_logits=teacher_logits, labels=labels, alpha=self.alpha,
            temperature=self.temperature,
        )
