"""SimCLR / DINO / MAE / SiLC baselines: losses vs loop-based references, method mechanics, DINO
local crops from the crop stage, loss falling on a fixed batch, one Ray Train smoke run per method."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from pipeline.config import Config, ConfigError, DinoConfig, MaeConfig, ObjectiveConfig, ViewsConfig
from pipeline.models.ab_model import images_to_float
from pipeline.models.encoder import build_encoder
from pipeline.objectives.base import Progress
from pipeline.objectives.dino import DinoCentre, DinoHead, dino_loss, teacher_temperature
from pipeline.objectives.mae import mae_loss, patchify, random_masking
from pipeline.objectives.registry import build_objective
from tests.micro import MICRO_MODEL
from tests.test_objectives_text import CONTEXT, MICRO_TEXT_MODEL, TEXT, ref_symmetric_nce

B, LOCAL, LOCAL_SIZE = 8, 3, 16
MICRO_DINO = DinoConfig(out_dim=64, hidden_dim=32, bottleneck_dim=16)
MICRO_MAE = MaeConfig(decoder_dim=32, decoder_depth=1, decoder_heads=2)
VIEWS = {  # each method's crop-stage settings (32 px views, as the Ray smoke runs)
    "simclr": dict(num_views=0, annotation_views=2),
    "dino": dict(
        num_views=0, annotation_views=2, local_views=LOCAL, local_size=LOCAL_SIZE, annotation_scale=(0.4, 1.0)
    ),
    "mae": dict(num_views=1, annotation_views=0, scale=(0.2, 1.0)),
    "silc": dict(
        num_views=0,
        annotation_views=2,
        local_views=LOCAL,
        local_size=LOCAL_SIZE,
        annotation_scale=(0.4, 1.0),
        text=TEXT,
    ),
}


def method_config(name: str, **objective) -> Config:
    obj = ObjectiveConfig(name=name, dino=MICRO_DINO, mae=MICRO_MAE, **objective)
    model = MICRO_TEXT_MODEL if name == "silc" else MICRO_MODEL
    return Config(model=model, views=ViewsConfig(view_size=32, **VIEWS[name]), objective=obj)


def gratings(g: torch.Generator, views: int, size: int) -> torch.Tensor:
    """(B, views, size, size, 3) uint8 coloured sine gratings of random orientation and period: a
    masked patch is predictable from the visible ones (white noise would not be)."""
    theta = torch.rand(B * views, 1, 1, generator=g) * math.pi
    period = 6 + 6 * torch.rand(B * views, 1, 1, generator=g)
    yy, xx = torch.meshgrid(
        torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij"
    )
    wave = torch.sin(2 * math.pi * (xx * torch.cos(theta) + yy * torch.sin(theta)) / period)
    image = 0.5 + 0.5 * wave[..., None] * torch.rand(B * views, 1, 1, 3, generator=g)
    return (image * 255).round().to(torch.uint8).reshape(B, views, size, size, 3)


def fixed_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Two views of each image: the grating and its mirror image (a SimCLR positive pair)."""
    g = torch.Generator().manual_seed(seed)
    image = gratings(g, 1, 32)
    return {
        "views": image,
        "ann_views": torch.cat([image, image.flip(3)], dim=1),
        "local_views": gratings(g, LOCAL, LOCAL_SIZE),
        "tokens": torch.randint(1, 400, (B, CONTEXT), generator=g),
    }


# --------------------------------------------------------------------------- losses vs references


def test_simclr_objective_loss_matches_loop_reference():
    obj = build_objective(method_config("simclr"))
    batch = fixed_batch()
    loss = obj(batch, Progress(0, 10)).loss.item()
    with torch.no_grad():  # embeddings through the bare modules, then Eq. 5 with python loops
        x = images_to_float(batch["ann_views"])
        z = [
            obj.head(obj.encoder.forward_head(obj.encoder.forward_features(x[:, v]), pre_logits=True)).double().numpy()
            for v in (0, 1)
        ]
    t = obj.cfg.objective.temperature
    total = 0.0
    for i in range(B):
        logits = [[float(np.dot(z[0][a], z[1][b])) / t for b in range(B)] for a in range(B)]
        total -= logits[i][i] - math.log(sum(math.exp(v) for v in logits[i]))
        total -= logits[i][i] - math.log(sum(math.exp(logits[j][i]) for j in range(B)))
    assert loss == pytest.approx(total / (2 * B), rel=1e-5)


def reference_dino(
    s: np.ndarray, t: np.ndarray, c: np.ndarray, student_temp: float, teacher_temp: float, skip_same_view: bool
) -> float:
    """DINO's loss with python loops: teacher view iq vs student view v, image i, prototype j."""

    def softmax(row):
        m = max(row)
        e = [math.exp(v - m) for v in row]
        return [v / sum(e) for v in e]

    (v_t, b, k), v_s = t.shape, s.shape[0]
    terms = []
    for iq in range(v_t):
        for v in range(v_s):
            if skip_same_view and v == iq:  # a student view is never matched to the teacher's view of the same crop
                continue
            per_image = []
            for i in range(b):
                p_t = softmax([(t[iq, i, j] - c[j]) / teacher_temp for j in range(k)])
                p_s = softmax([s[v, i, j] / student_temp for j in range(k)])
                per_image.append(-sum(p_t[j] * math.log(p_s[j]) for j in range(k)))
            terms.append(sum(per_image) / b)
    assert len(terms) == (v_t * v_s - v_t if skip_same_view else v_t * v_s)
    return sum(terms) / len(terms)


@pytest.mark.parametrize("skip_same_view", [True, False])
def test_dino_loss_matches_loop_reference(skip_same_view):
    g = torch.Generator().manual_seed(1)
    student, teacher = (
        torch.randn(5, 3, 7, generator=g, dtype=torch.float64),
        torch.randn(2, 3, 7, generator=g, dtype=torch.float64),
    )
    center = torch.randn(1, 7, generator=g, dtype=torch.float64)
    got, _ = dino_loss(student, teacher, center, 0.1, 0.04, skip_same_view)
    want = reference_dino(student.numpy(), teacher.numpy(), center.numpy()[0], 0.1, 0.04, skip_same_view)
    assert got.item() == pytest.approx(want, rel=1e-9)


def test_silc_loss_is_clip_plus_local_to_global_distillation():
    """Recomputed from the bare modules: CLIP on the first global view + weighted DINO loss of the
    student's local views against the teacher's two global views (every pair)."""
    cfg = method_config("silc", clip=dataclasses.replace(ObjectiveConfig().clip, ssl_weight=0.5))
    obj = build_objective(cfg)
    with torch.no_grad():  # a teacher and centre that differ from the student / zero, as mid-training
        for p in obj.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
        obj.centre.center.normal_()
    centre = obj.centre.center.clone()
    batch = fixed_batch()
    got = obj(batch, Progress(0, 10)).loss.item()

    enc = obj.net.encoder
    with torch.no_grad():

        def pooled(module, images):
            return module.forward_head(module.forward_features(images_to_float(images)), pre_logits=True)

        z_img = torch.nn.functional.normalize(obj.net.image_projection(pooled(enc, batch["ann_views"][:, 0])), dim=-1)
        z_txt = obj.net.text(batch["tokens"])
        clip = ref_symmetric_nce(z_img.double().numpy(), z_txt.double().numpy(), math.exp(obj.net.log_scale.item()))
        student = torch.stack([obj.dino_head(pooled(enc, batch["local_views"][:, v])) for v in range(LOCAL)])
        teacher = torch.stack(
            [obj.teacher.head(pooled(obj.teacher.encoder, batch["ann_views"][:, v])) for v in range(2)]
        )
    d = cfg.objective.dino
    distill = reference_dino(
        student.double().numpy(),
        teacher.double().numpy(),
        centre.double().numpy()[0],
        d.student_temp,
        d.warmup_teacher_temp,
        False,
    )
    assert got == pytest.approx(clip + 0.5 * distill, rel=1e-4)


def test_dino_centre_is_a_momentum_mean_of_teacher_logits():
    centre = DinoCentre(4, momentum=0.9)
    centre.center.fill_(1.0)
    logits = torch.arange(24, dtype=torch.float32).view(2, 3, 4)  # (views, batch, K)
    centre.update(logits)
    mean = [sum(float(logits[v, i, j]) for v in range(2) for i in range(3)) / 6 for j in range(4)]
    assert centre.center[0].tolist() == pytest.approx([0.9 * 1.0 + 0.1 * m for m in mean])


def test_teacher_temperature_warms_up_linearly():
    d = DinoConfig(warmup_teacher_temp=0.04, teacher_temp=0.07, teacher_temp_warmup_fraction=0.3)
    assert teacher_temperature(0, 100, d) == pytest.approx(0.04)
    assert teacher_temperature(15, 100, d) == pytest.approx(0.055)
    assert teacher_temperature(30, 100, d) == teacher_temperature(99, 100, d) == pytest.approx(0.07)


def test_patchify_matches_loop_reference():
    x = torch.randn(2, 3, 8, 12)
    got = patchify(x, 4)  # (2, 6, 48)
    for b in range(2):
        for n, (r, c) in enumerate((r, c) for r in range(2) for c in range(3)):
            want = [float(x[b, ch, r * 4 + i, c * 4 + j]) for i in range(4) for j in range(4) for ch in range(3)]
            assert got[b, n].tolist() == pytest.approx(want)


def test_mae_loss_matches_loop_reference():
    g = torch.Generator().manual_seed(2)
    pred, target = (
        torch.randn(2, 5, 6, generator=g, dtype=torch.float64),
        torch.randn(2, 5, 6, generator=g, dtype=torch.float64),
    )
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 1, 0, 1]], dtype=torch.float64)
    p, t = pred.numpy(), target.numpy()
    errors = []
    for b in range(2):
        for n in range(5):
            if mask[b, n] == 0:
                continue
            mean = sum(t[b, n]) / 6
            var = sum((v - mean) ** 2 for v in t[b, n]) / 5  # unbiased, as MAE's .var()
            errors.append(sum((p[b, n, j] - (t[b, n, j] - mean) / math.sqrt(var + 1e-6)) ** 2 for j in range(6)) / 6)
    assert mae_loss(pred, target, mask).item() == pytest.approx(sum(errors) / len(errors), rel=1e-9)
    raw = sum(((p[b, n] - t[b, n]) ** 2).mean() for b in range(2) for n in range(5) if mask[b, n]) / 5
    assert mae_loss(pred, target, mask, norm_pix=False).item() == pytest.approx(raw, rel=1e-9)


# ------------------------------------------------------------------------------- method mechanics


def test_random_masking_drops_75_percent_per_image():
    torch.manual_seed(0)
    keep, restore, mask = random_masking(4, 16, 0.75, "cpu")
    assert keep.shape == (4, 4) and mask.sum(1).tolist() == [12.0] * 4
    for b in range(4):
        assert sorted(torch.nonzero(mask[b] == 0).flatten().tolist()) == sorted(keep[b].tolist())
    assert len({tuple(sorted(k.tolist())) for k in keep}) > 1, "each image gets its own mask"


def test_mae_encoder_sees_only_visible_patches():
    """Changing a dropped patch must not change the encoder output; changing a kept one must."""
    obj = build_objective(method_config("mae")).eval()
    x = torch.randn(1, 3, 32, 32)
    torch.manual_seed(3)
    keep, _, mask = random_masking(1, 16, 0.75, "cpu")
    dropped = int(torch.nonzero(mask[0]).flatten()[0])
    kept = int(keep[0, 0])

    def with_patch_changed(n: int) -> torch.Tensor:
        y = x.clone()
        r, c = divmod(n, 4)
        y[:, :, r * 8 : (r + 1) * 8, c * 8 : (c + 1) * 8] += 5.0
        return obj.encode_visible(y, keep)

    base = obj.encode_visible(x, keep)
    assert base.shape == (1, 1 + 4, 48)
    assert torch.allclose(with_patch_changed(dropped), base)
    assert not torch.allclose(with_patch_changed(kept), base, atol=1e-3)


def test_dino_head_last_layer_is_weight_normed_and_freezes():
    head = DinoHead(48, MICRO_DINO)
    w = head.last_layer.weight
    assert torch.allclose(w.norm(dim=1), torch.ones(MICRO_DINO.out_dim), atol=1e-5)
    assert not head.last_layer.parametrizations.weight.original0.requires_grad

    cfg = method_config("dino")
    cfg.objective.dino = dataclasses.replace(MICRO_DINO, freeze_last_layer_fraction=0.5)
    obj = build_objective(cfg)
    before_last = obj.student.head.last_layer.weight.detach().clone()
    before_mlp = obj.student.head.mlp[0].weight.detach().clone()
    opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.04)
    obj(fixed_batch(), Progress(0, 10)).loss.backward()  # step 0 < 0.5 * 10: frozen
    assert torch.count_nonzero(obj.student.head.last_layer.parametrizations.weight.original1.grad) == 0
    opt.step()
    assert torch.allclose(obj.student.head.last_layer.weight, before_last, atol=1e-6), "direction unchanged"
    assert not torch.allclose(obj.student.head.mlp[0].weight, before_mlp)
    opt.zero_grad()
    obj(fixed_batch(), Progress(5, 10)).loss.backward()  # past the freeze
    assert torch.count_nonzero(obj.student.head.last_layer.parametrizations.weight.original1.grad) > 0


def test_dino_uses_local_views_and_teacher_sees_only_globals():
    obj = build_objective(method_config("dino"))
    batch = fixed_batch()
    out = obj(batch, Progress(0, 10, diagnose=True))
    changed = dict(batch, local_views=255 - batch["local_views"])
    assert obj(changed, Progress(0, 10)).loss.item() != pytest.approx(out.loss.item()), "local views enter the student"
    assert out.diagnostics["head"].shape == (B, MICRO_DINO.bottleneck_dim)
    assert float(out.metrics["teacher_temp"]) == pytest.approx(MICRO_DINO.warmup_teacher_temp)


@pytest.mark.parametrize("name", sorted(VIEWS))
def test_encoder_is_built_first_and_loads_into_the_eval_encoder(name):
    """Same seed -> the eval job's random-init ViT; weights load into `build_encoder(cfg.model, S)`."""
    cfg = method_config(name)
    obj = build_objective(cfg)
    torch.manual_seed(cfg.train.seed)
    reference = build_encoder(cfg.model, cfg.views.view_size)
    state = obj.student_encoder.state_dict()
    assert set(state) == set(reference.state_dict())
    assert all(torch.equal(state[k], v) for k, v in reference.state_dict().items())
    reference.load_state_dict(obj.encoders()["teacher"].state_dict())


@pytest.mark.parametrize(
    "name, views, key",
    [
        ("simclr", dict(num_views=0, annotation_views=1), "views.annotation_views"),
        ("simclr", dict(num_views=4, annotation_views=2), "views.num_views"),
        ("dino", dict(num_views=0, annotation_views=3), "views.annotation_views"),
        ("dino", dict(num_views=2, annotation_views=2), "views.num_views"),
        ("mae", dict(num_views=0, annotation_views=0), "views.num_views"),
        ("mae", dict(num_views=1, annotation_views=2), "views.annotation_views"),
        ("silc", dict(num_views=0, annotation_views=2, local_views=0, text=TEXT), "views.local_views"),
        ("silc", dict(num_views=0, annotation_views=2, local_views=2), "views.text.source"),
    ],
)
def test_views_that_cannot_feed_the_method_are_config_errors(name, views, key):
    cfg = method_config(name)
    cfg.views = ViewsConfig(view_size=32, **views)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_objective(cfg)


def test_mae_mask_ratio_out_of_range_is_a_config_error():
    cfg = method_config("mae")
    cfg.objective.mae = dataclasses.replace(MICRO_MAE, mask_ratio=1.0)
    with pytest.raises(ConfigError, match=r"objective\.mae\.mask_ratio"):
        build_objective(cfg)


# --------------------------------------------------------------------------- DINO local crops (data)


def test_local_views_are_extra_and_leave_other_views_unchanged(photo_files):
    from PIL import Image

    from pipeline.data.crop_stage import MultiViewCropper, draft_size
    from pipeline.data.views import make_views

    image = np.asarray(Image.open(photo_files[0]).convert("RGB"))
    plain = ViewsConfig(num_views=2, view_size=32, annotation_views=2, annotation_scale=(0.4, 1.0))
    multi = dataclasses.replace(plain, local_views=4, local_size=16, local_scale=(0.05, 0.4))
    a, b = make_views(image, np.random.default_rng(5), plain), make_views(image, np.random.default_rng(5), multi)
    assert "local_views" not in a
    for k in ("views", "boxes", "ann_views"):
        assert np.array_equal(a[k], b[k]), k
    assert b["local_views"].shape == (4, 16, 16, 3) and b["local_views"].dtype == np.uint8
    assert len({v.tobytes() for v in b["local_views"]}) == 4

    # the draft decode keeps the smallest local crop >= local_size: 16 * sqrt(4/3 / 0.05) > 32 * sqrt(4/3 / 0.25)
    assert draft_size(multi) == math.ceil(16 * math.sqrt((4 / 3) / 0.05)) > draft_size(plain)
    batch = {"key": np.array(["x", "y"]), "jpg": np.array([p.read_bytes() for p in photo_files[:2]], dtype=object)}
    out = MultiViewCropper(multi, seed=0, stats_name=None)(batch)
    assert out["local_views"].shape == (2, 4, 16, 16, 3)
    assert "local_views" not in MultiViewCropper(plain, seed=0, stats_name=None)(batch)


# ------------------------------------------------------------------------ loss falls, in-process


@pytest.mark.parametrize("name", sorted(VIEWS))
def test_loss_falls_on_a_fixed_batch(name):
    """AdamW steps on one batch. DINO's loss is CE = H(teacher) + KL and the teacher moves, so its
    fitted part (loss - teacher entropy, a mean KL) is what must shrink. MAE must beat predicting
    zeros (the mean of a normalised patch), not just fall towards it."""
    cfg = method_config(name)
    cfg.objective.dino = dataclasses.replace(
        MICRO_DINO, teacher_temp_warmup_fraction=0.0, freeze_last_layer_fraction=0.0
    )
    obj = build_objective(cfg)
    steps, lr = (30, 1e-2) if name == "mae" else (20, 3e-3)
    opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=lr)
    batch, history = fixed_batch(), []
    torch.manual_seed(0)
    for step in range(steps):
        progress = Progress(step, steps, ema_rate=0.004)
        out = obj(batch, progress)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        obj.after_step(progress)
        history.append(out.loss.item() - (out.metrics["teacher_entropy"].item() if name in ("dino", "silc") else 0.0))
    first, last = sum(history[:3]) / 3, sum(history[-5:]) / 5
    if name == "mae":
        target = patchify(images_to_float(batch["views"]).flatten(0, 1), obj.patch)
        zeros = mae_loss(torch.zeros_like(target), target, torch.ones(target.shape[:2])).item()
        assert last < 0.9 * zeros and last < 0.8 * first, (zeros, history)
    else:
        assert last < 0.6 * first, history


# ------------------------------------------------------------------------ Ray Train smoke runs


@pytest.fixture(scope="module")
def silc_shards(ray_cluster, digits_folder, session_tmp):
    """Digit shards whose samples carry captions (SiLC's text annotations)."""
    from pipeline.config import IngestConfig
    from pipeline.data.shards import write_shards

    items = [
        {"input": str(path), "labels": [str(d)], "captions": [f"a photo of the digit {d}"]}
        for d in range(10)
        for path in sorted((digits_folder / str(d)).iterdir())[:3]
    ]
    out = session_tmp / "silc_shards"
    assert write_shards(items, str(out), "image_folder", IngestConfig(samples_per_shard=15))["counts"]["ok"] == 30
    return out


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", sorted(VIEWS))
def test_method_trains_through_the_pipeline(ray_cluster, request, tmp_path, name):
    """2 steps of each method on the real crop stage + MLflow + checkpoints; eval loads the result. The loop runs
    in the driver (train.num_workers=0): what differs by method is the loop's, and Ray Train's own path (its
    workers, their reports and restarts) is test_train's, test_resume's and test_production's, for AB.
    SiLC trains on digit shards that carry captions (its text annotations)."""
    from mlflow.tracking import MlflowClient

    from pipeline.checkpoints import read_meta
    from pipeline.models.encoder import load_frozen_model
    from pipeline.train.trainer import run_pretrain
    from tests.test_train import micro_config

    shards = request.getfixturevalue("silc_shards" if name == "silc" else "digit_shards")
    base = micro_config(tmp_path, shards, steps=2, num_workers=0)
    views = dataclasses.replace(base.views, **VIEWS[name])
    per_image = views.num_views + views.annotation_views + views.local_views
    cfg = dataclasses.replace(
        base,
        views=views,
        model=method_config(name).model,
        objective=method_config(name).objective,
        train=dataclasses.replace(base.train, total_views=2 * 8 * per_image, run_name=name),
    )
    result = run_pretrain(cfg)
    meta = read_meta(result["checkpoint"])
    assert meta["step"] == 2 and meta["views_seen"] == 2 * 8 * per_image
    assert math.isfinite(result["metrics"]["loss"])
    run = MlflowClient(cfg.tracking.tracking_uri).get_run(result["run_id"])
    assert run.data.tags["abpipe.objective"] == name
    assert {"loss", "lr", "rankme_encoder"} <= set(run.data.metrics)
    for which in ("teacher", "student"):
        model, _ = load_frozen_model(result["checkpoint"], which=which)
        assert model.encoder_features(torch.zeros(2, 3, 32, 32)).shape == (2, 48)
