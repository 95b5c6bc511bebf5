"""Zero-shot classification and image-text retrieval: readouts of a checkpoint's image and text towers.

The feature probes read the ViT's frozen features; these read the two functions a text-tower method
(CLIP, SLIP, SiLC, AB_CLIP) learnt, z_img and z_txt (pipeline.objectives.towers; for AB_CLIP
z_img = phi(x), the identity action through the decoder and head):

- **zero-shot classification** (Radford et al. 2021): each class name goes through every prompt
  template ("a photo of a {}."), the text embeddings of a class are averaged and renormalised, and an
  image is given the class whose embedding is closest (cosine) to its own. Box tasks score each box:
  the box is cut from the full-resolution image and resized to the encoder's input size.
- **retrieval**: images (centre-cropped) and all their captions through the towers, recall@1/5/10
  both ways by `pipeline.eval.retrieval.retrieval_recall` (several captions per image).

Metrics are fractions in [0, 1], as every probe's: `zero_shot_top1`, `zero_shot_top5` (more than 5
classes only: below that it is always 1), `zero_shot_chance` (1 / classes), `zero_shot_n_images`
(`zero_shot_n_boxes` on box tasks); `retrieval_i2t_r{1,5,10}`, `retrieval_t2i_r{1,5,10}`,
`retrieval_n_images`, `retrieval_n_captions`. An image that does not decode is left out and counted.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_TEMPLATES",
    "box_crops",
    "check_templates",
    "class_embeddings",
    "prompt_name",
    "retrieval_readout",
    "run_readout",
    "zero_shot_metrics",
    "zero_shot_readout",
]

# A few of CLIP's 80 ImageNet prompt templates (openai/CLIP, notebooks/Prompt_Engineering_for_ImageNet).
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a photo of the {}.",
    "itap of a {}.",
    "a bad photo of the {}.",
    "a close-up photo of a {}.",
    "a low resolution photo of a {}.",
    "a photo of the small {}.",
)
TEXT_BATCH = 256  # prompts / captions through the text tower at once


def check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    """The templates to use: DEFAULT_TEMPLATES when empty; ValueError unless each has one `{}`."""
    if isinstance(templates, str):
        raise ValueError(f"templates: expected a list of strings, got the string {templates!r}")
    templates = tuple(templates) or DEFAULT_TEMPLATES
    bad = [t for t in templates if not isinstance(t, str) or t.count("{}") != 1]
    if bad:
        raise ValueError(f'templates: each needs exactly one "{{}}" where the class name goes, got {bad[:3]}')
    return templates


def prompt_name(class_name: str) -> str:
    """A dataset's class name as it goes into a prompt: underscores to spaces ("golden_retriever")."""
    return " ".join(str(class_name).replace("_", " ").split())


def _embed_tokens(towers, tokens, batch_size: int = TEXT_BATCH):
    import torch

    device = towers.log_scale.device
    with torch.inference_mode():
        parts = [towers.embed_texts(tokens[i : i + batch_size].to(device)) for i in range(0, len(tokens), batch_size)]
    return torch.cat(parts)


def class_embeddings(towers, class_names: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES):
    """(C, P) float32 unit rows on the towers' device: each class through every template, the unit text
    embeddings averaged over the templates and renormalised (CLIP's zero-shot classifier).

    Class names are used as given (`prompt_name` makes dataset names readable); an empty `templates`
    means DEFAULT_TEMPLATES. Raises ValueError on no classes, an empty name or a template without `{}`.
    """
    import torch

    templates = check_templates(templates)
    names = [str(n) for n in class_names]
    if not names:
        raise ValueError("class_names: no classes")
    empty = [i for i, n in enumerate(names) if not n.strip()]
    if empty:
        raise ValueError(f"class_names: class(es) {empty[:5]} have an empty name")
    prompts = [t.replace("{}", name) for name in names for t in templates]
    z = _embed_tokens(towers, towers.tokenize(prompts)).reshape(len(names), len(templates), -1)
    return torch.nn.functional.normalize(z.mean(dim=1), dim=-1)


def zero_shot_metrics(z_images, z_classes, labels) -> dict[str, float]:
    """top-1 / top-5 of the nearest class embedding (cosine) against `labels`, fractions in [0, 1].

    z_images (N, P), z_classes (C, P) (normalised here), labels (N,) ints in [0, C). `zero_shot_top5`
    only when C > 5 (at or below, it is 1 for every model); `zero_shot_chance` = 1 / C. Ties break
    toward the lower class index.
    """
    from pipeline.metrics import classification_metrics

    images, classes = _unit(z_images, "z_images"), _unit(z_classes, "z_classes")
    if images.shape[1] != classes.shape[1]:
        raise ValueError(f"z_images has dim {images.shape[1]}, z_classes dim {classes.shape[1]}: one space needed")
    labels = np.asarray(labels)
    if labels.shape != (images.shape[0],) or labels.dtype.kind not in "iu":
        raise ValueError(f"labels: expected ({images.shape[0]},) integer class ids, got {labels.shape} {labels.dtype}")
    outside = np.flatnonzero((labels < 0) | (labels >= classes.shape[0]))
    if outside.size:
        raise ValueError(f"labels: class id(s) {labels[outside[:5]].tolist()} outside the {classes.shape[0]} classes")
    got = classification_metrics(images @ classes.T, labels.astype(np.int64), classes.shape[0])
    out = {f"zero_shot_{k}": float(v) for k, v in got.items()}
    out["zero_shot_chance"] = 1.0 / classes.shape[0]
    return out


def _unit(x, name: str) -> np.ndarray:
    from pipeline.eval.retrieval import unit_rows

    return unit_rows(x.detach().cpu() if hasattr(x, "detach") else x, name)


# ------------------------------------------------------------------------------------ reading images


def box_crops(image: np.ndarray, boxes, size: int) -> np.ndarray:
    """uint8 (K, size, size, 3): each [0, 1] xyxy box of the full image `image` (H, W, 3), cut out
    (outward to whole pixels, at least one) and resized to size x size (bicubic, the whole box kept)."""
    from PIL import Image

    h, w = image.shape[:2]
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    out = np.zeros((len(boxes), size, size, 3), np.uint8)
    for k, (x0, y0, x1, y1) in enumerate(np.clip(boxes, 0.0, 1.0)):
        left, top = min(int(math.floor(x0 * w)), w - 1), min(int(math.floor(y0 * h)), h - 1)
        right, bottom = max(int(math.ceil(x1 * w)), left + 1), max(int(math.ceil(y1 * h)), top + 1)
        crop = Image.fromarray(np.ascontiguousarray(image[top:bottom, left:right]))
        out[k] = np.asarray(crop.resize((size, size), Image.BICUBIC))
    return out


def _batches(items: Sequence, load, batch_size: int, skipped: Counter) -> Iterator[tuple[list[int], np.ndarray]]:
    """(indices of the items read, their uint8 images stacked) per batch; unreadable items counted by reason.

    `load(item)` returns (n, S, S, 3): n = 1 for a whole image, one per box for box crops."""
    from pipeline.data.schema import BadImage

    done, images = [], []
    for i, item in enumerate(items):
        try:
            images.append(load(item))
            done.append(i)
        except BadImage as exc:
            skipped[exc.reason] += 1
        if sum(len(x) for x in images) >= batch_size or (i == len(items) - 1 and images):
            yield done, np.concatenate(images)
            done, images = [], []


def _embed_images(towers, images: np.ndarray):
    import torch

    from pipeline.models.ab_model import images_to_float

    device = towers.log_scale.device
    with torch.inference_mode():
        x = images_to_float(torch.from_numpy(np.ascontiguousarray(images)).to(device))
        return towers.embed_images(x).float().cpu().numpy()


# ------------------------------------------------------------------------------------------ readouts


def zero_shot_readout(
    towers, examples, task, templates: Sequence[str] = (), image_size: int = 224, batch_size: int = 128
) -> dict[str, Any]:
    """Zero-shot classification of a task's test examples (`pipeline.eval.tasks.Example`s).

    Classification: each image centre-cropped to image_size. Box classification: every box of each
    image, cut from the full image (`box_crops`). Returns {"metrics", "skipped", "n_images"}."""
    from pipeline.eval.features import load_and_resize, read_rgb
    from pipeline.eval.probe_data import BOX_CLASSIFICATION, CLASSIFICATION

    if task.kind not in (CLASSIFICATION, BOX_CLASSIFICATION):
        raise ValueError(f"zero_shot: task '{task.name}' is a {task.kind} task; it reads classification and boxes")
    z_classes = class_embeddings(towers, [prompt_name(n) for n in task.class_names], templates).float().cpu().numpy()
    skipped: Counter = Counter()
    boxes = task.kind == BOX_CLASSIFICATION
    if boxes:
        items = [ex for ex in examples if ex.boxes is not None and len(ex.boxes)]
        skipped["no_boxes"] += len(examples) - len(items)

        def load(ex):
            return box_crops(read_rgb(ex.input), ex.boxes, image_size)

    else:
        items = list(examples)

        def load(ex):
            return load_and_resize(ex.input, image_size, "crop")[None]

    z, labels, n_images = [], [], 0
    for done, images in _batches(items, load, batch_size, skipped):
        z.append(_embed_images(towers, images))
        for i in done:
            labels += list(np.asarray(items[i].box_labels).reshape(-1)) if boxes else [items[i].label]
        n_images += len(done)
    if not z:
        raise ValueError(f"zero_shot: no readable test image in task '{task.name}' (skipped: {dict(skipped)})")
    metrics = zero_shot_metrics(np.concatenate(z), z_classes, np.asarray(labels, np.int64))
    metrics["zero_shot_n_images"] = float(n_images)
    if boxes:
        metrics["zero_shot_n_boxes"] = float(len(labels))
    return {"metrics": metrics, "skipped": {k: int(v) for k, v in skipped.items() if v}, "n_images": n_images}


def retrieval_readout(towers, examples, image_size: int = 224, batch_size: int = 128) -> dict[str, Any]:
    """Image <-> text recall@1/5/10 over a captions task's examples (each an image + its captions).

    Images are centre-cropped to image_size; an image that does not decode is left out with its
    captions, and counted. Returns {"metrics", "skipped", "n_images"}."""
    from pipeline.eval.features import load_and_resize
    from pipeline.eval.retrieval import retrieval_recall

    skipped: Counter = Counter()
    items = [ex for ex in examples if ex.captions]
    skipped["no_captions"] += len(examples) - len(items)
    z, texts, owner = [], [], []  # owner: each caption's row among the images kept

    def load(ex):
        return load_and_resize(ex.input, image_size, "crop")[None]

    n_kept = 0
    for done, images in _batches(items, load, batch_size, skipped):
        for i in done:
            texts += items[i].captions
            owner += [n_kept] * len(items[i].captions)
            n_kept += 1
        z.append(_embed_images(towers, images))
    if not z:
        raise ValueError(f"retrieval: no readable image with captions (skipped: {dict(skipped)})")
    z_text = _embed_tokens(towers, towers.tokenize(texts)).float().cpu().numpy()
    recall = retrieval_recall(np.concatenate(z), z_text, np.asarray(owner, np.int64), ks=(1, 5, 10))
    metrics = {f"retrieval_{k}": float(v) for k, v in recall.items()}
    metrics.update({"retrieval_n_images": float(n_kept), "retrieval_n_captions": float(len(texts))})
    return {"metrics": metrics, "skipped": {k: int(v) for k, v in skipped.items() if v}, "n_images": n_kept}


def run_readout(
    name: str,
    checkpoint_dir: str | os.PathLike,
    examples,
    task,
    which: str = "teacher",
    templates: Sequence[str] = (),
    batch_size: int = 128,
    use_gpu: bool = False,
) -> dict[str, Any]:
    """What the eval job's readout task runs: load the towers from `checkpoint_dir`, then `name`
    (zero_shot | retrieval) on `examples` at the checkpoint's input size (views.view_size)."""
    import torch

    from pipeline.objectives.towers import load_towers

    device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    towers, cfg = load_towers(checkpoint_dir, which=which, device=device)
    size = cfg.views.view_size
    if name == "zero_shot":
        return zero_shot_readout(towers, examples, task, templates, size, batch_size)
    if name == "retrieval":
        return retrieval_readout(towers, examples, size, batch_size)
    raise ValueError(f"unknown readout {name!r}; known: zero_shot, retrieval")
