"""Two gloo workers (DDP) must produce the same loss and gradients as one process on the whole batch.

This is the check for the classic silent bug: gathering embeddings without gradients makes the
2-worker gradient differ from the single-worker one.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.config import ObjectiveConfig
from pipeline.models.ab_model import build_model
from pipeline.objectives.ab_simclr import ab_simclr_step
from pipeline.objectives.contrastive import symmetric_info_nce
from pipeline.objectives.ema import make_teacher
from tests.micro import MICRO_MODEL

B, M = 4, 3  # images per worker, crops per image


def make_batch(n: int):
    g = torch.Generator().manual_seed(123)
    crops = torch.randint(0, 256, (n, M, 32, 32, 3), dtype=torch.uint8, generator=g)
    lo = torch.rand(n, M, 2, generator=g) * 0.5
    boxes = torch.cat([lo, lo + 0.3 + 0.2 * torch.rand(n, M, 2, generator=g)], dim=-1)
    ann = torch.randint(0, 256, (n, 2, 32, 32, 3), dtype=torch.uint8, generator=g)
    return crops, boxes, ann


def fresh_models():
    torch.manual_seed(0)
    student = build_model(MICRO_MODEL, 32)
    teacher = make_teacher(student)
    with torch.no_grad():  # a teacher that differs from the student, as mid-training
        for p in teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return student, teacher


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    student, teacher = fresh_models()
    ddp = torch.nn.parallel.DistributedDataParallel(student)
    crops, boxes, ann = make_batch(B * world)
    sl = slice(rank * B, (rank + 1) * B)
    out = ab_simclr_step(ddp, teacher, crops[sl], boxes[sl], ann[sl], ObjectiveConfig())
    loss = out.loss
    loss.backward()
    losses = [torch.zeros(1) for _ in range(world)]
    dist.all_gather(losses, loss.detach().view(1))
    if rank == 0:
        grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
        torch.save({"loss": torch.cat(losses).mean(), "grads": grads}, os.path.join(out_dir, "ddp.pt"))
    dist.destroy_process_group()


def run_two_workers(tmp_path):
    mp.start_processes(
        _worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True, start_method="spawn"
    )
    return torch.load(tmp_path / "ddp.pt")


def single_worker_reference():
    student, teacher = fresh_models()
    crops, boxes, ann = make_batch(2 * B)
    out = ab_simclr_step(student, teacher, crops, boxes, ann, ObjectiveConfig())
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}


@pytest.mark.ray  # two spawned processes in a gloo process group: the full tier
@pytest.mark.timeout(300)
def test_two_gloo_workers_match_single_worker(tmp_path):
    ref_loss, ref_grads = single_worker_reference()
    ddp = run_two_workers(tmp_path)
    assert ddp["loss"].item() == pytest.approx(ref_loss.item(), rel=1e-4)
    assert ref_grads.keys() == ddp["grads"].keys()
    for name, g in ref_grads.items():
        assert torch.allclose(ddp["grads"][name], g, rtol=1e-3, atol=1e-6), name


@pytest.mark.timeout(300)
def test_local_negatives_do_not_match(tmp_path):
    """The check can fail: a per-worker loss without the global gather gives different gradients."""
    student, _ = fresh_models()
    _, a = student(torch.zeros(2 * B, 1, 3, 32, 32), torch.zeros(2 * B, 1, 1, 4), torch.zeros(2 * B, 2, 3, 32, 32))
    a = a + 0.01 * torch.randn_like(a)
    full = symmetric_info_nce(a[:, 0], a[:, 1], 0.1)
    halves = 0.5 * (symmetric_info_nce(a[:B, 0], a[:B, 1], 0.1) + symmetric_info_nce(a[B:, 0], a[B:, 1], 0.1))
    assert abs(full.item() - halves.item()) > 1e-3
