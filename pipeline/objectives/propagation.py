"""AB's propagation loss (Eq. 4): soft cross-entropy from the EMA teacher's annotation distribution
on the target crop to the student's prediction from (source crop, bb_{s->t})."""

from __future__ import annotations

import torch


def teacher_distribution(z_targets: torch.Tensor, z_annotations: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax_i f_ema(x', l_i): (B, M, P) x (N, P) -> (B, M, N). Computed without gradient."""
    with torch.no_grad():
        return torch.softmax(z_targets @ z_annotations.T / temperature, dim=-1)


def propagation_loss(
    pred: torch.Tensor, teacher_probs: torch.Tensor, z_annotations: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Mean over all (b, s, t) of  -sum_i p_teacher(l_i | x_t) log p_student(l_i | x_s, a_{s->t}).

    pred (B, M, M, P) indexed [b, source, target]; teacher_probs (B, M, N) indexed [b, target];
    z_annotations (N, P): the annotation embeddings the student scores against.
    """
    log_student = torch.log_softmax(pred @ z_annotations.T / temperature, dim=-1)  # (B, M, M, N)
    return -(teacher_probs[:, None, :, :] * log_student).sum(-1).mean()


def per_pair_error(
    pred: torch.Tensor, teacher_probs: torch.Tensor, z_annotations: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Per-pair soft cross-entropy (B, M, M), for diagnostics such as error binned by IoU."""
    with torch.no_grad():
        log_student = torch.log_softmax(pred @ z_annotations.T / temperature, dim=-1)
        return -(teacher_probs[:, None, :, :] * log_student).sum(-1)
