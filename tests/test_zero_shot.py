"""Zero-shot classification and image-text retrieval from a checkpoint's own towers: against hand
computations (numpy, per-prompt averaging, brute-force ranking), on constructed cases whose answer is
known, on bad captions data, and once through the whole eval job (Ray + MLflow) for CLIP and SimCLR."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from pipeline.config import Config, ConfigError, EvalConfig, PathsConfig, RayConfig, TrackingConfig, load_config
from pipeline.eval.probe_data import BOX_CLASSIFICATION, CLASSIFICATION, TaskInfo
from pipeline.eval.task_formats.base import Example, TaskFormatError
from pipeline.eval.zero_shot import (
    DEFAULT_TEMPLATES,
    box_crops,
    class_embeddings,
    prompt_name,
    run_readout,
    zero_shot_metrics,
)
from pipeline.models.ab_model import images_to_float
from pipeline.objectives.towers import load_towers
from tests.test_export import micro_method_config, save_like_the_loop, trained_objective

CLASSES = ["red_fox", "golden_retriever", "tabby_cat", "school_bus", "teapot", "sea_lion", "hot_air_balloon"]
TEMPLATES = ["a photo of a {}.", "a drawing of the {}"]


# ------------------------------------------------------------------------------------- references


def ref_image_embedding(towers, path, size: int, box=None) -> np.ndarray:
    """One image through PIL (centre crop, or the box cut out to whole pixels and stretched) and z_img."""
    image = Image.open(path).convert("RGB")
    if box is None:
        image = ImageOps.fit(image, (size, size), Image.BICUBIC)
    else:
        w, h = image.size
        left, top = math.floor(box[0] * w), math.floor(box[1] * h)
        right, bottom = max(math.ceil(box[2] * w), left + 1), max(math.ceil(box[3] * h), top + 1)
        image = image.crop((left, top, right, bottom)).resize((size, size), Image.BICUBIC)
    with torch.no_grad():
        z = towers.embed_images(images_to_float(torch.from_numpy(np.asarray(image)[None].copy())))
    return z[0].numpy().astype(np.float64)


def ref_class_embeddings(towers, names, templates) -> np.ndarray:
    """Each prompt alone through the text tower, the class's unit embeddings averaged, renormalised."""
    tokens = towers.tokenize([t.replace("{}", name) for name in names for t in templates])  # the run's tokenizer
    rows = []
    for c in range(len(names)):
        with torch.no_grad():
            per_prompt = [
                towers.embed_texts(tokens[c * len(templates) + t][None])[0].numpy().astype(np.float64)
                for t in range(len(templates))
            ]
        mean = np.mean(per_prompt, axis=0)
        rows.append(mean / np.linalg.norm(mean))
    return np.stack(rows)


def ref_rank(scores: np.ndarray, label: int) -> int:
    """0-based position of `label` when classes are sorted by score, highest first, lower index first on ties."""
    return int(sum(1 for c, s in enumerate(scores) if s > scores[label] or (s == scores[label] and c < label)))


def ref_recall(img: np.ndarray, txt: np.ndarray, owner: list[int], k: int) -> tuple[float, float]:
    """(i2t, t2i) recall@k by sorting every query's candidates, the slow obvious way."""
    img = img / np.linalg.norm(img, axis=1, keepdims=True)
    txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    s = img @ txt.T
    i2t = [
        any(owner[j] == i for j in sorted(range(len(txt)), key=lambda j: (-s[i, j], j))[:k]) for i in range(len(img))
    ]
    t2i = [owner[j] in sorted(range(len(img)), key=lambda i: (-s[i, j], i))[:k] for j in range(len(txt))]
    return float(np.mean(i2t)), float(np.mean(t2i))


# --------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def clip_ckpt(tmp_path_factory) -> str:
    """A micro CLIP checkpoint saved as the loop saves it, every weight moved off its init."""
    cfg, objective = trained_objective("clip")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in objective.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return save_like_the_loop(objective, cfg, tmp_path_factory.mktemp("clip") / "ckpt")


def noise_image(path, seed: int, size=(40, 32)) -> str:
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return str(path)


def make_captions(root, n_images: int = 5) -> tuple[str, list[list[str]]]:
    """COCO captions layout: val2017/*.jpg + annotations/captions_val2017.json, 2 captions per good image,
    plus one listed image missing on disk, one without captions, a blank caption, a caption of an unlisted
    image, and one file that is not an image."""
    words = ["fox", "bus", "teapot", "balloon", "cat", "dog", "boat"]
    images, annotations, texts = [], [], []
    for k in range(n_images):
        name = f"{k + 1:012d}.jpg"
        noise_image(os.path.join(root, "val2017", name), seed=100 + k, size=(40 + 4 * k, 32))
        images.append({"id": k + 1, "file_name": name, "width": 40 + 4 * k, "height": 32})
        texts.append([f"a {words[k]} in the snow", f"two {words[k]}s on a table"])
        annotations += [{"id": 10 * k + j, "image_id": k + 1, "caption": c} for j, c in enumerate(texts[-1])]
    images.append({"id": 90, "file_name": "000000000090.jpg"})  # listed, never written: missing_image
    annotations.append({"id": 900, "image_id": 90, "caption": "a caption of a missing image"})
    images.append({"id": 91, "file_name": "000000000091.jpg"})  # no captions
    noise_image(os.path.join(root, "val2017", "000000000091.jpg"), seed=91)
    annotations.append({"id": 901, "image_id": 1, "caption": "   "})  # empty_caption
    annotations.append({"id": 902, "image_id": 777, "caption": "a caption of no listed image"})
    images.append({"id": 92, "file_name": "000000000092.jpg"})  # on disk but not an image
    with open(os.path.join(root, "val2017", "000000000092.jpg"), "w") as fh:
        fh.write("not a jpeg")
    annotations.append({"id": 903, "image_id": 92, "caption": "an unreadable image"})
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    with open(os.path.join(root, "annotations", "captions_val2017.json"), "w") as fh:
        json.dump({"info": {}, "images": images, "annotations": annotations}, fh)
    return str(root), texts


# ------------------------------------------------------------------------------------ zero-shot math


def test_zero_shot_metrics_on_a_constructed_case():
    """One-hot class embeddings and images built so the true class sits at a chosen rank: 3 of 8 right at
    top-1, 6 of 8 within the top 5."""
    n_classes = 8
    classes = np.eye(n_classes) * 3.0  # any scale: normalised inside
    labels = np.array([0, 1, 2, 3, 4, 5, 6, 7])
    ranks = [0, 0, 0, 1, 4, 3, 5, 7]  # where each image's true class ends up
    images = np.zeros((8, n_classes))
    for i, (label, rank) in enumerate(zip(labels, ranks)):
        others = [c for c in range(n_classes) if c != label]
        order = others[:rank] + [label] + others[rank:]  # classes from highest to lowest score
        images[i, order] = np.linspace(1.0, 0.1, n_classes)
    got = zero_shot_metrics(images, classes, labels)
    assert got == {"zero_shot_top1": 3 / 8, "zero_shot_top5": 6 / 8, "zero_shot_chance": 1 / 8}
    # five classes or fewer: top-5 would be 1 for any model, so it is not reported
    few = zero_shot_metrics(images[:, :4] + 0.01, np.eye(4), np.array([0, 1, 2, 3, 0, 1, 2, 3]))
    assert set(few) == {"zero_shot_top1", "zero_shot_chance"} and few["zero_shot_chance"] == 0.25
    # an exact tie goes to the lower class index
    assert zero_shot_metrics(np.ones((2, 2)), np.eye(2), np.array([0, 1]))["zero_shot_top1"] == 0.5


@pytest.mark.parametrize(
    "images,classes,labels,match",
    [
        (np.ones((3, 4)), np.ones((5, 3)), [0, 1, 2], "z_images has dim 4, z_classes dim 3"),
        (np.ones((3, 3)), np.eye(3), [0, 1, 3], r"class id\(s\) \[3\] outside the 3 classes"),
        (np.ones((3, 3)), np.eye(3), [0.0, 1.0, 2.0], "integer class ids"),
        (np.ones((3, 3)), np.eye(3), [0, 1], r"expected \(3,\)"),
        (np.zeros((3, 3)), np.eye(3), [0, 1, 2], "zero-norm"),
        (np.ones((0, 3)), np.eye(3), [], "non-empty"),
    ],
)
def test_zero_shot_metrics_rejects_bad_inputs(images, classes, labels, match):
    with pytest.raises(ValueError, match=match):
        zero_shot_metrics(images, classes, np.asarray(labels))


def test_class_embeddings_average_each_prompt_then_renormalise(clip_ckpt):
    towers, _ = load_towers(clip_ckpt)
    names = [prompt_name(c) for c in CLASSES]
    assert names[1] == "golden retriever" and prompt_name("hot__air_balloon ") == "hot air balloon"
    for templates in (TEMPLATES, DEFAULT_TEMPLATES):
        got = class_embeddings(towers, names, templates)
        want = ref_class_embeddings(towers, names, templates)
        assert got.shape == (len(CLASSES), want.shape[1]) and got.dtype == torch.float32
        np.testing.assert_allclose(got.numpy(), want, atol=1e-5)
    assert torch.equal(class_embeddings(towers, names, []), class_embeddings(towers, names, DEFAULT_TEMPLATES))
    assert not np.allclose(class_embeddings(towers, names, TEMPLATES[:1]).numpy(), want, atol=1e-3), (
        "one template is not the average of eight"
    )
    with pytest.raises(ValueError, match=r'exactly one "\{\}"'):
        class_embeddings(towers, names, ["a photo of a cat"])
    with pytest.raises(ValueError, match="empty name"):
        class_embeddings(towers, ["cat", " "], TEMPLATES)


def test_zero_shot_readout_matches_the_hand_computation(clip_ckpt, tmp_path):
    """The job's readout (towers loaded from the checkpoint, images read from files) gives exactly the
    top-1/top-5 of a numpy computation on the same towers; the labels are set from that computation so
    the answer is known: 4 of 12 right at top-1, 8 of 12 in the top 5."""
    towers, cfg = load_towers(clip_ckpt)
    size = cfg.views.view_size
    paths = [noise_image(tmp_path / f"img_{i}.png", seed=i, size=(40 + 2 * i, 32)) for i in range(12)]
    z_img = np.stack([ref_image_embedding(towers, p, size) for p in paths])
    z_cls = ref_class_embeddings(towers, [c.replace("_", " ") for c in CLASSES], TEMPLATES)
    scores = z_img @ z_cls.T
    wanted_rank = [0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 6, 5]
    labels = [int(np.argsort(-s, kind="stable")[r]) for s, r in zip(scores, wanted_rank)]
    assert [ref_rank(s, y) for s, y in zip(scores, labels)] == wanted_rank
    top1 = np.mean([ref_rank(s, y) < 1 for s, y in zip(scores, labels)])
    top5 = np.mean([ref_rank(s, y) < 5 for s, y in zip(scores, labels)])
    assert (top1, top5) == (4 / 12, 8 / 12)

    assert zero_shot_metrics(z_img, z_cls, np.array(labels)) == pytest.approx(
        {"zero_shot_top1": top1, "zero_shot_top5": top5, "zero_shot_chance": 1 / 7}
    )
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    examples = [Example(input=p, label=y) for p, y in zip(paths, labels)]
    examples.insert(5, Example(input=str(broken), label=0))
    info = TaskInfo("hand", CLASSIFICATION, CLASSES)
    out = run_readout("zero_shot", clip_ckpt, examples, info, templates=TEMPLATES, batch_size=5)
    assert out["metrics"] == pytest.approx(
        {"zero_shot_top1": top1, "zero_shot_top5": top5, "zero_shot_chance": 1 / 7, "zero_shot_n_images": 12}
    )
    assert out["skipped"] == {"not_image": 1} and out["n_images"] == 12
    shuffled = [dataclasses.replace(ex, label=(ex.label + 1) % 7) for ex in examples]
    assert run_readout("zero_shot", clip_ckpt, shuffled, info, templates=TEMPLATES)["metrics"]["zero_shot_top1"] != top1


def test_box_crops_cut_each_box_from_the_full_image():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    boxes = np.array([[0.1, 0.2, 0.55, 0.9], [0.5, 0.5, 0.5, 0.5], [0.0, 0.0, 1.0, 1.0]], np.float32)
    got = box_crops(image, boxes, 16)
    assert got.shape == (3, 16, 16, 3) and got.dtype == np.uint8
    pil = Image.fromarray(image)
    want0 = pil.crop((6, 9, math.ceil(0.55 * 64), math.ceil(0.9 * 48))).resize((16, 16), Image.BICUBIC)
    np.testing.assert_array_equal(got[0], np.asarray(want0))
    np.testing.assert_array_equal(got[1], np.broadcast_to(image[24, 32], (16, 16, 3)))  # empty box: its one pixel
    np.testing.assert_array_equal(got[2], np.asarray(pil.resize((16, 16), Image.BICUBIC)))


def test_box_task_is_scored_per_box(clip_ckpt, tmp_path):
    """coco_objects: every test box cut from its image and classified; top-1 against the hand computation."""
    from pipeline.eval.tasks import load_task
    from tests.task_fixtures import make_coco

    data = load_task("coco_objects", make_coco(str(tmp_path / "coco")))
    assert data.info.kind == BOX_CLASSIFICATION
    towers, cfg = load_towers(clip_ckpt)
    z_cls = ref_class_embeddings(towers, data.info.class_names, DEFAULT_TEMPLATES)
    ranks = [
        ref_rank(z_cls @ ref_image_embedding(towers, ex.input, cfg.views.view_size, box), int(label))
        for ex in data.test
        for box, label in zip(ex.boxes, ex.box_labels)
    ]
    out = run_readout("zero_shot", clip_ckpt, data.test, data.info)
    n_boxes = sum(len(ex.boxes) for ex in data.test)
    assert n_boxes == len(ranks) == 3 and out["n_images"] == len(data.test) == 2
    assert out["metrics"] == pytest.approx(
        {
            "zero_shot_top1": np.mean([r == 0 for r in ranks]),
            "zero_shot_chance": 1 / 3,
            "zero_shot_n_images": 2,
            "zero_shot_n_boxes": 3,
        }
    )


# ------------------------------------------------------------------------------------ captions task


def test_captions_task_skips_and_counts_what_it_cannot_use(tmp_path):
    from pipeline.eval.tasks import load_task

    root, texts = make_captions(tmp_path / "captions")
    data = load_task("coco_captions", root)
    assert data.info.kind == "captions" and data.info.class_names == [] and data.train == []
    assert [ex.captions for ex in data.test[:5]] == texts and data.test[5].input.endswith("000000000092.jpg")
    assert data.skipped == {
        "test/caption_of_unlisted_image": 1,
        "test/empty_caption": 1,
        "test/missing_image": 1,
        "test/no_captions": 1,
    }
    assert len(load_task("coco_captions", root, max_per_split=3).test) == 3
    with pytest.raises(KeyError, match="known tasks: folder, .*, coco_captions"):
        load_task("flickr30k", root)


@pytest.mark.parametrize(
    "content,match",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", 'expected an object with an "images" list'),
        (json.dumps({"images": []}), 'expected an object with an "annotations" list'),
        (json.dumps({"images": [{"id": 1}], "annotations": []}), r'images\[0\] needs an "id" and a "file_name"'),
        (
            json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1, "caption": 5}]}),
            r'annotations\[0\] needs an "image_id" and a "caption" string',
        ),
        (
            json.dumps(
                {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}], "annotations": []}
            ),
            r"image id 1 listed twice",
        ),
    ],
)
def test_malformed_captions_json_names_the_file(tmp_path, content, match):
    from pipeline.eval.tasks import load_task

    (tmp_path / "val2017").mkdir()
    path = tmp_path / "annotations" / "captions_val2017.json"
    path.parent.mkdir()
    path.write_text(content)
    with pytest.raises(TaskFormatError, match=match) as err:
        load_task("coco_captions", str(tmp_path))
    assert str(path) in str(err.value) and "expected layout" in str(err.value)


def test_captions_task_without_images_folder_or_usable_images(tmp_path):
    from pipeline.eval.tasks import load_task

    with pytest.raises(TaskFormatError, match=r"val2017: missing folder"):
        load_task("coco_captions", str(tmp_path))
    (tmp_path / "val2017").mkdir()
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "captions_val2017.json").write_text(
        json.dumps({"images": [{"id": 1, "file_name": "gone.jpg"}], "annotations": [{"image_id": 1, "caption": "x"}]})
    )
    with pytest.raises(TaskFormatError, match="the test split has no examples"):
        load_task("coco_captions", str(tmp_path))


def test_retrieval_readout_matches_brute_force_recall(clip_ckpt, tmp_path):
    from pipeline.eval.tasks import load_task

    root, texts = make_captions(tmp_path / "captions")
    data = load_task("coco_captions", root)
    out = run_readout("retrieval", clip_ckpt, data.test, data.info, batch_size=2)
    assert out["skipped"] == {"not_image": 1} and out["n_images"] == 5
    towers, cfg = load_towers(clip_ckpt)
    z_img = np.stack([ref_image_embedding(towers, ex.input, cfg.views.view_size) for ex in data.test[:5]])
    tokens = towers.tokenize([c for caps in texts for c in caps])
    with torch.no_grad():
        z_txt = np.stack([towers.embed_texts(row[None])[0].numpy() for row in tokens])  # one caption at a time
    owner = [i for i, caps in enumerate(texts) for _ in caps]
    want = {"retrieval_n_images": 5.0, "retrieval_n_captions": 10.0}
    for k in (1, 5, 10):
        want[f"retrieval_i2t_r{k}"], want[f"retrieval_t2i_r{k}"] = ref_recall(z_img, z_txt, owner, k)
    assert out["metrics"] == pytest.approx(want)
    assert 0 < want["retrieval_t2i_r1"] < 1 or 0 < want["retrieval_i2t_r1"] < 1, "a case that tells orders apart"


# ------------------------------------------------------------------------------------- config + wiring


def test_config_keys_registry_and_sweep_metrics():
    from pipeline.eval.job import check_probe_names, eval_signature
    from pipeline.eval.probes import MODEL_READOUTS, PROBES
    from pipeline.eval.sweep import _probe_metrics

    cfg = load_config(overrides=["eval.probes=[linear,zero_shot,retrieval]", 'eval.zero_shot_templates=["a {} here"]'])
    assert cfg.eval.zero_shot_templates == ["a {} here"] and MODEL_READOUTS == ("zero_shot", "retrieval")
    check_probe_names(cfg.eval)
    with pytest.raises(ConfigError, match=r'eval.zero_shot_templates: each needs exactly one "\{\}"'):
        check_probe_names(dataclasses.replace(cfg.eval, zero_shot_templates=["no slot"]))
    with pytest.raises(ConfigError, match="eval.probes: unknown.*known: .*zero_shot, retrieval"):
        check_probe_names(EvalConfig(probes=["zero_shoot"]))
    assert PROBES["retrieval"].kinds == ("captions",) and BOX_CLASSIFICATION in PROBES["zero_shot"].kinds
    # the default templates leave the signature of pairs done before the setting existed unchanged
    from pipeline.eval.cache import digest

    ev = EvalConfig()
    before = {k: v for k, v in dataclasses.asdict(ev).items() if k != "zero_shot_templates"}
    for k in ("checkpoint", "dataset", "tasks", "task_roots", "cache_dir", "use_gpu", "batch_size"):
        before.pop(k)
    assert eval_signature(ev, "folder", "/data") == digest({"task": "folder", "root": "/data", **before})[:16]
    assert eval_signature(dataclasses.replace(ev, zero_shot_templates=["a {}"]), "folder", "/data") != (
        eval_signature(ev, "folder", "/data")
    )
    logged = {
        "zero_shot_top1": 0.5,
        "zero_shot_chance": 0.2,
        "retrieval_i2t_r1": 0.25,
        "knn_top1": 0.3,
        "n_train": 3.0,
        "eval_s": 2.0,
        "skipped/zero_shot/corrupt": 1.0,
    }
    assert set(_probe_metrics(logged)) == {"zero_shot_top1", "zero_shot_chance", "retrieval_i2t_r1", "knn_top1"}


@pytest.mark.ray
def test_eval_job_runs_zero_shot_and_retrieval_and_skips_them_without_a_text_tower(
    ray_cluster, clip_ckpt, tmp_path, caplog
):
    """CLIP: zero-shot beside kNN on a folder task, retrieval on a captions task, logged to MLflow equal to
    the in-process readout. SimCLR: the readouts skipped with one log line, kNN still runs, nothing fails."""
    from mlflow.tracking import MlflowClient

    from pipeline.eval.job import evaluate_checkpoint, summary_rows
    from pipeline.eval.tasks import load_task
    from pipeline.objectives.registry import build_objective

    folder = tmp_path / "shapes"
    for c, name in enumerate(CLASSES[:6]):
        for i in range(4):
            noise_image(folder / name / f"{name}_{i}.png", seed=10 * c + i)
    captions, _ = make_captions(tmp_path / "captions")
    cfg = Config(
        paths=PathsConfig(root=str(tmp_path / "root")),
        ray=RayConfig(num_cpus=2),
        tracking=TrackingConfig(experiment="zero-shot-test"),
        eval=EvalConfig(
            tasks=["folder", "coco_captions"],
            task_roots={"folder": str(folder), "coco_captions": captions},
            probes=["knn", "zero_shot", "retrieval"],
            zero_shot_templates=TEMPLATES,
            random_init=False,
            knn_k=5,
            batch_size=16,
        ),
    ).resolved()
    client = MlflowClient(cfg.tracking.tracking_uri)

    result = evaluate_checkpoint(cfg, clip_ckpt)
    assert result["failures"] == {}
    folder_res, captions_res = result["tasks"]["folder"], result["tasks"]["coco_captions"]
    data = load_task("folder", str(folder), seed=0)
    want = run_readout("zero_shot", clip_ckpt, data.test, data.info, templates=TEMPLATES)["metrics"]
    m = folder_res["metrics"]
    assert {k: m[k] for k in want} == pytest.approx(want) and {"knn_top1", "knn_top5"} <= set(m)
    assert m["zero_shot_chance"] == pytest.approx(1 / 6) and m["zero_shot_n_images"] == len(data.test) == 6
    assert all(0 <= m[k] <= 1 for k in ("zero_shot_top1", "zero_shot_top5", "knn_top1"))
    logged = client.get_run(folder_res["run_id"]).data.metrics
    assert logged["zero_shot_top1"] == pytest.approx(m["zero_shot_top1"]) and "knn_top1" in logged
    c = captions_res["metrics"]
    assert set(c) == {f"retrieval_{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)} | {
        "retrieval_n_images",
        "retrieval_n_captions",
    }
    assert c["retrieval_n_images"] == 5 and c["retrieval_n_captions"] == 10
    assert all(0 <= c[f"retrieval_{d}_r{k}"] <= 1 for d in ("i2t", "t2i") for k in (1, 5, 10))
    assert c["retrieval_t2i_r10"] == 1.0, "5 images: every caption's image is in its top 10"
    run = client.get_run(captions_res["run_id"])
    assert run.info.status == "FINISHED" and run.data.metrics["retrieval_i2t_r1"] == pytest.approx(
        c["retrieval_i2t_r1"]
    )
    assert run.data.metrics["skipped/test/missing_image"] == 1 and run.data.metrics["skipped/retrieval/not_image"] == 1
    _, rows = summary_rows(result)
    assert ("  zero_shot_top1", m["zero_shot_top1"], None) in rows and any("retrieval_t2i_r1" in r[0] for r in rows)

    simclr_cfg = micro_method_config("simclr")
    simclr = save_like_the_loop(build_objective(simclr_cfg), simclr_cfg, tmp_path / "simclr")
    with caplog.at_level(logging.INFO, logger="abpipe.eval"):
        other = evaluate_checkpoint(cfg, simclr)
    notes = [r.getMessage() for r in caplog.records if "no text tower" in r.getMessage()]
    assert len(notes) == 1 and "zero_shot and retrieval skipped" in notes[0] and "'simclr'" in notes[0], notes
    assert other["failures"] == {}
    assert set(other["tasks"]["folder"]["metrics"]) == {"knn_top1", "knn_top5"}
    skipped = other["tasks"]["coco_captions"]
    assert skipped["metrics"] == {} and set(skipped["skipped_readouts"]) == {"retrieval"}
    run = client.get_run(skipped["run_id"])
    assert run.info.status == "FINISHED" and "no text tower" in run.data.tags["abpipe.skipped_readouts"]
    assert ("  zero_shot: skipped, its method 'simclr' has no text tower", None, None) in summary_rows(other)[1]
