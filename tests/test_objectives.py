"""Losses, EMA and schedules against independent, deliberately naive reference computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.config import ObjectiveConfig
from pipeline.geometry import relative_box
from pipeline.models.ab_model import build_model, images_to_float
from pipeline.objectives.ab_simclr import ab_simclr_step, pair_actions
from pipeline.objectives.contrastive import symmetric_info_nce
from pipeline.objectives.ema import ema_update, make_teacher
from pipeline.objectives.propagation import propagation_loss, teacher_distribution
from pipeline.schedules import ema_rate, ema_start_for_run, warmup_cosine
from tests.micro import MICRO_MODEL


def unit(rows: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(rows, dim, generator=g, dtype=torch.float64), dim=-1)


def reference_info_nce(x: np.ndarray, l: np.ndarray, t: float) -> float:
    """Eq. 5 written out term by term with python loops, averaged over i and over the 2 directions."""
    n = len(x)
    f = [[float(np.dot(x[i], l[j])) / t for j in range(n)] for i in range(n)]
    total = 0.0
    for i in range(n):
        img_to_ann = f[i][i] - math.log(sum(math.exp(f[i][j]) for j in range(n)))
        ann_to_img = f[i][i] - math.log(sum(math.exp(f[j][i]) for j in range(n)))
        total += -(img_to_ann + ann_to_img) / 2
    return total / n


def test_info_nce_matches_reference():
    x, l = unit(7, 5, 0), unit(7, 5, 1)
    got = symmetric_info_nce(x, l, 0.1).item()
    assert got == pytest.approx(reference_info_nce(x.numpy(), l.numpy(), 0.1), rel=1e-9)


def test_info_nce_is_low_for_matched_pairs_and_high_for_shuffled():
    x = unit(16, 8, 2)
    matched = symmetric_info_nce(x, x, 0.1).item()
    shuffled = symmetric_info_nce(x, x[torch.randperm(16, generator=torch.Generator().manual_seed(0))], 0.1).item()
    assert matched < 0.5 < math.log(16) < shuffled + 1.0


def reference_propagation(pred, targets, ann_student, ann_teacher, t):
    """Eq. 4 with explicit loops over image b, source s, target t and annotation i."""
    b_, m_, _, _ = pred.shape
    n = len(ann_student)
    losses = []
    for b in range(b_):
        for s in range(m_):
            for tt in range(m_):
                teacher_logits = [float(np.dot(targets[b, tt], ann_teacher[i])) / t for i in range(n)]
                z_t = sum(math.exp(v) for v in teacher_logits)
                student_logits = [float(np.dot(pred[b, s, tt], ann_student[i])) / t for i in range(n)]
                z_s = sum(math.exp(v) for v in student_logits)
                losses.append(
                    -sum(math.exp(teacher_logits[i]) / z_t * (student_logits[i] - math.log(z_s)) for i in range(n))
                )
    return sum(losses) / len(losses)


def test_propagation_loss_matches_reference():
    b, m, n, p = 3, 4, 6, 5
    pred = unit(b * m * m, p, 3).view(b, m, m, p)
    targets = unit(b * m, p, 4).view(b, m, p)
    ann_s, ann_t = unit(n, p, 5), unit(n, p, 6)
    probs = teacher_distribution(targets, ann_t, 0.1)
    got = propagation_loss(pred, probs, ann_s, 0.1).item()
    want = reference_propagation(pred.numpy(), targets.numpy(), ann_s.numpy(), ann_t.numpy(), 0.1)
    assert got == pytest.approx(want, rel=1e-9)


def test_propagation_loss_minimum_is_teacher_entropy():
    """Soft CE is minimised (= teacher entropy) exactly when the student matches the teacher."""
    targets = unit(4, 6, 7).view(1, 4, 6)
    ann = unit(5, 6, 8)
    probs = teacher_distribution(targets, ann, 0.2)
    matching = targets[:, None, :, :].expand(1, 4, 4, 6)
    entropy = -(probs * probs.log()).sum(-1).mean().item()
    assert propagation_loss(matching, probs, ann, 0.2).item() == pytest.approx(entropy, rel=1e-9)
    other = unit(16, 6, 9).view(1, 4, 4, 6)
    assert propagation_loss(other, probs, ann, 0.2).item() > entropy


def test_teacher_gets_no_gradient():
    targets = unit(4, 6, 7).view(1, 4, 6).requires_grad_(True)
    probs = teacher_distribution(targets, unit(5, 6, 8), 0.1)
    assert not probs.requires_grad


@pytest.mark.parametrize("tau", [0.25, torch.tensor(0.25)], ids=["float", "device tensor"])
def test_ema_update_matches_manual_formula(tau):
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    teacher = make_teacher(student)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
        student[1].running_mean.fill_(3.0)
    ema_update(teacher, student, tau)
    for name, p in student.named_parameters():
        expect = before[name] * 0.75 + p.detach() * 0.25
        assert torch.allclose(teacher.state_dict()[name], expect)
    assert torch.equal(teacher[1].running_mean, torch.full((4,), 3.0))
    assert all(not p.requires_grad for p in teacher.parameters())


def test_ema_rate_cosine_schedule():
    assert ema_rate(0, 100) == pytest.approx(0.004)
    assert ema_rate(100, 100) == pytest.approx(0.0)
    assert ema_rate(50, 100) == pytest.approx(0.002)
    assert ema_rate(25, 100) == pytest.approx(0.004 * (1 + math.cos(math.pi / 4)) / 2)
    rates = [ema_rate(s, 100) for s in range(101)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))


def test_short_runs_raise_the_teacher_rate_to_a_horizon_of_the_run():
    """tau_0 = max(ema_start, 1 / (horizon * T)), capped at 1: the paper's 0.004 at its scale, faster in short runs."""
    assert ema_start_for_run(0.004, 100_000, 1 / 15) == pytest.approx(0.004)
    assert ema_start_for_run(0.004, 3750, 1 / 15) == pytest.approx(0.004)
    assert ema_start_for_run(0.004, 300, 1 / 15) == pytest.approx(0.05)
    assert ema_start_for_run(0.004, 6, 1 / 15) == 1.0
    assert ema_start_for_run(0.004, 300, 0.0) == 0.004
    assert ema_start_for_run(0.2, 300, 1 / 15) == 0.2  # a faster configured rate is kept
    assert ema_rate(0, 300, 0.004, 0.0, 1 / 15) == pytest.approx(0.05)
    assert ema_rate(150, 300, 0.004, 0.0, 1 / 15) == pytest.approx(0.025)
    assert ema_rate(300, 300, 0.004, 0.0, 1 / 15) == pytest.approx(0.0)


def test_warmup_cosine():
    assert warmup_cosine(0, 100, 10, 1.0, 0.0) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10, 1.0, 0.0) == pytest.approx(1.0)
    assert warmup_cosine(10, 100, 10, 1.0, 0.0) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10, 1.0, 0.0) == pytest.approx(0.5)
    assert warmup_cosine(100, 100, 10, 1.0, 0.1) == pytest.approx(0.1)


def test_pair_actions_all_pairs_and_identity_diagonal():
    boxes = torch.tensor([[[0.1, 0.2, 0.6, 0.9], [0.3, 0.0, 1.0, 0.5], [0.0, 0.0, 1.0, 1.0]]], dtype=torch.float64)
    actions = pair_actions(boxes)
    for s in range(3):
        for t in range(3):
            assert torch.allclose(actions[0, s, t], relative_box(boxes[0, s], boxes[0, t]))
        assert torch.allclose(actions[0, s, s], torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64))
    assert torch.count_nonzero(pair_actions(boxes, null_actions=True)) == 0


def test_decoder_groups_are_independent_and_identity_is_phi():
    torch.manual_seed(0)
    model = build_model(MICRO_MODEL, 32).eval()
    x = images_to_float(torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8))
    memory = model.encode(x)
    actions = torch.tensor([[[0.0, 0.0, 1.0, 1.0], [0.2, 0.1, 0.9, 0.7]]]).expand(2, 2, 4).clone()
    out = model.predict(memory, actions)
    changed = actions.clone()
    changed[:, 1] = torch.tensor([-0.5, 0.3, 0.4, 1.6])
    out2 = model.predict(memory, changed)
    assert torch.allclose(out[:, 0], out2[:, 0], atol=1e-6), "group 0 must not see group 1's tokens"
    assert not torch.allclose(out[:, 1], out2[:, 1], atol=1e-4), "the action must change the prediction"
    assert torch.allclose(out[:, 0], model.embed(x), atol=1e-6), "identity action is the plain representation"


def test_student_step_diagonal_equals_plain_embedding():
    """pred[b, s, s] (identity action) must be phi(crop s): the two heads are one network."""
    torch.manual_seed(0)
    student = build_model(MICRO_MODEL, 32).eval()
    teacher = make_teacher(student)
    crops = torch.randint(0, 256, (2, 3, 32, 32, 3), dtype=torch.uint8)
    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.2, 0.2, 1.0, 0.9], [0.1, 0.3, 0.6, 1.0]]).expand(2, 3, 4)
    ann = torch.randint(0, 256, (2, 2, 32, 32, 3), dtype=torch.uint8)
    pred, _ = student(images_to_float(crops), pair_actions(boxes), images_to_float(ann))  # what the step runs
    phi = student.embed(images_to_float(crops).flatten(0, 1)).view(2, 3, -1)
    for s in range(3):
        assert torch.allclose(pred[:, s, s], phi[:, s], atol=1e-5)
    out = ab_simclr_step(student, teacher, crops, boxes, ann, ObjectiveConfig(), diagnose=True)
    assert set(out.terms) == {"annotation", "propagation"}
    assert out.diagnostics["pair_error"].shape == (2, 3, 3) and out.diagnostics["pair_iou"].shape == (2, 3, 3)
    assert torch.allclose(out.diagnostics["pair_iou"].diagonal(dim1=1, dim2=2), torch.ones(2, 3, dtype=torch.float64))
    assert 0 < out.metrics["teacher_entropy"] <= math.log(2) + 1e-6  # a distribution over the 2 annotations
    assert ab_simclr_step(student, teacher, crops, boxes, ann, ObjectiveConfig()).diagnostics == {}


@pytest.mark.parametrize("detach", [True, False])
def test_propagation_trains_the_annotation_embeddings_unless_detached(detach):
    """Eq. 4: g(x, a, l) = phi_bar(x, a)^T psi_bar(l) with psi_bar among the trained parameters (detach=False);
    detach=True freezes psi_bar inside the propagation loss (the annotation loss still trains it)."""
    torch.manual_seed(0)
    student = build_model(MICRO_MODEL, 32)
    teacher = make_teacher(student)
    crops = torch.randint(0, 256, (4, 2, 32, 32, 3), dtype=torch.uint8)
    boxes = torch.tensor([[0.0, 0.0, 0.6, 0.7], [0.3, 0.2, 1.0, 1.0]]).expand(4, 2, 4)
    ann = torch.randint(0, 256, (4, 2, 32, 32, 3), dtype=torch.uint8)
    cfg = ObjectiveConfig(annotation_weight=0.0, detach_annotations=detach)  # the propagation loss alone
    captured = {}
    handle = student.head.register_forward_hook(lambda m, i, o: captured.setdefault("outs", []).append(o))
    out = ab_simclr_step(student, teacher, crops, boxes, ann, cfg)
    handle.remove()
    ann_embeddings = captured["outs"][-1]  # the head's last call: the annotation views' embeddings
    assert ann_embeddings.shape[0] == 4 * 2
    grad = torch.autograd.grad(out.loss, ann_embeddings, allow_unused=True)[0]
    if detach:
        assert grad is None or torch.count_nonzero(grad) == 0
    else:
        assert grad is not None and grad[1::2].abs().sum() > 0  # the annotation views l_i = view 1 of each image
        assert torch.count_nonzero(grad[0::2]) == 0  # view 0 only enters the annotation loss


def test_propagation_weight_ramps_over_its_warmup():
    from pipeline.objectives.ab_simclr import propagation_weight
    from pipeline.objectives.base import Progress

    cfg = ObjectiveConfig(propagation_weight=2.0, propagation_warmup=0.1)
    assert propagation_weight(cfg, Progress(0, 1000)) == 0.0
    assert propagation_weight(cfg, Progress(50, 1000)) == pytest.approx(1.0)
    assert propagation_weight(cfg, Progress(100, 1000)) == pytest.approx(2.0)
    assert propagation_weight(cfg, Progress(900, 1000)) == pytest.approx(2.0)
    assert propagation_weight(ObjectiveConfig(propagation_weight=2.0), Progress(0, 1000)) == 2.0
