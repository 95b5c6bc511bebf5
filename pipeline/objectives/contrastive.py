"""Symmetric InfoNCE (SimCLR/CLIP form) over the *global* batch, gathered across workers with grads.

Gathering with plain `dist.all_gather` silently drops the gradient through other workers'
embeddings; `torch.distributed.nn.functional.all_gather` keeps it, so the loss and its gradient
equal the single-process computation on the whole global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every worker along dim 0; gradients flow back to each owner."""
    _, size = world()
    if size == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    _, size = world()
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def symmetric_info_nce(z_images: torch.Tensor, z_annotations: torch.Tensor, temperature: float) -> torch.Tensor:
    """Eq. 5 of the paper, averaged over rows: this worker's rows against the global batch.

    z_* are unit-norm (B_local, P). Row i's positive is the annotation of the same global index.
    """
    rank, _ = world()
    all_images = gather_with_grad(z_images)
    all_annotations = gather_with_grad(z_annotations)
    b = z_images.shape[0]
    labels = torch.arange(b, device=z_images.device) + rank * b
    image_to_ann = z_images @ all_annotations.T / temperature
    ann_to_image = z_annotations @ all_images.T / temperature
    return 0.5 * (F.cross_entropy(image_to_ann, labels) + F.cross_entropy(ann_to_image, labels))
