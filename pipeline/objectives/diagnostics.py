"""Training-time health signals, as the SSL cookbook recommends watching: collapse and prediction
difficulty show up here long before a probe would show them.

- RankMe (Garrido et al. 2023): exp of the entropy of the normalised singular values of a batch of
  embeddings; ~1 means collapse to a line, ~min(N, D) means full use of the space.
- per-dimension std of L2-normalised embeddings (~1/sqrt(D) when healthy, 0 when collapsed).
- AB's propagation error binned by the IoU between source and target box (Fig. 3 bottom).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.metrics import rankme  # the same RankMe the label-free eval probe reports

IOU_BINS = (0.0, 0.1, 0.3, 0.5, 1.0001)  # [lo, hi) edges; the identity pair (IoU 1) is the last bin


def embedding_std(embeddings: torch.Tensor) -> float:
    """Mean over dimensions of the std across the batch of unit-normalised embeddings."""
    return float(F.normalize(embeddings.float(), dim=-1).std(dim=0).mean())


def iou_binned_error(pair_error: torch.Tensor, pair_iou: torch.Tensor, bins=IOU_BINS) -> dict[str, float]:
    """Mean propagation error per IoU bin: {"0.0-0.1": e, ...}; empty bins are left out."""
    err = pair_error.detach().float().flatten().cpu()
    iou = pair_iou.detach().float().flatten().cpu()
    out = {}
    for lo, hi in zip(bins[:-1], bins[1:]):
        mask = (iou >= lo) & (iou < hi)
        if mask.any():
            out[f"{lo:.1f}-{min(hi, 1.0):.1f}"] = float(err[mask].mean())
    return out


def step_diagnostics(diagnostics: dict[str, torch.Tensor]) -> dict[str, float]:
    """Flat metrics from a StepOutput's diagnostics tensors (whatever the method provided)."""
    metrics: dict[str, float] = {}
    for name, value in diagnostics.items():
        if name in ("pair_error", "pair_iou"):
            continue
        if value.ndim == 2 and value.shape[0] > 1:
            metrics[f"rankme_{name}"] = rankme(value.detach().float().cpu())
            metrics[f"std_{name}"] = embedding_std(value)
    if "pair_error" in diagnostics and "pair_iou" in diagnostics:
        for bin_name, value in iou_binned_error(diagnostics["pair_error"], diagnostics["pair_iou"]).items():
            metrics[f"prop_error_iou_{bin_name}"] = value
    return metrics
