"""Image-text retrieval recall@k, with the several-captions-per-image convention of the CLIP benchmarks.

The convention is that of CLIP_benchmark's `zeroshot_retrieval` (and open_clip's retrieval eval) on
COCO / Flickr captions, where every image has several captions and every caption one image:

- embeddings are L2-normalised and scored by their dot product (cosine similarity);
- text -> image: a caption counts as retrieved at k when its own image is among the k images that
  score highest against it;
- image -> text: an image counts as retrieved at k when ANY of its captions is among the k captions
  that score highest against it (a hit, not the fraction of its captions found).

recall@k is the fraction of queries (captions for t2i, images for i2t) retrieved at k. Ties in the
scores are broken by index (a stable sort of the scores, highest first: of two candidates that score
the same, the one listed first ranks first), so the result is deterministic; with real embeddings
exact ties are rare and this only matters for degenerate inputs.

Pure numpy, no model: the eval readout that embeds a captions task feeds this (docs/evaluation.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["retrieval_ranks", "retrieval_recall", "unit_rows"]

_CHUNK = 512  # query rows scored at once: bounds memory at _CHUNK x candidates float64


def unit_rows(emb, name: str) -> np.ndarray:
    """Rows of `emb` (n, dim) L2-normalised as float64; ValueError naming `name` if empty, non-finite or zero."""
    x = np.asarray(emb, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name}: expected a non-empty 2-D array (n, dim), got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name}: contains NaN or inf")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    zero = np.flatnonzero(norms[:, 0] == 0)
    if zero.size:
        raise ValueError(f"{name}: row(s) {zero[:5].tolist()} have zero norm (zero-norm rows cannot be L2-normalised)")
    return x / norms


def _check(image_emb, text_emb, text_to_image) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    images = unit_rows(image_emb, "image_emb")
    texts = unit_rows(text_emb, "text_emb")
    if images.shape[1] != texts.shape[1]:
        raise ValueError(
            f"image_emb has dim {images.shape[1]}, text_emb dim {texts.shape[1]}: they must share one embedding space"
        )
    owner = np.asarray(text_to_image)
    if owner.ndim != 1 or owner.shape[0] != texts.shape[0]:
        raise ValueError(
            f"text_to_image: expected one image index per caption, shape ({texts.shape[0]},), got {owner.shape}"
        )
    if owner.dtype.kind not in "iu":
        raise ValueError(f"text_to_image: expected integer image indices, got dtype {owner.dtype}")
    owner = owner.astype(np.int64)
    bad = np.flatnonzero((owner < 0) | (owner >= images.shape[0]))
    if bad.size:
        raise ValueError(
            f"text_to_image: caption(s) {bad[:5].tolist()} point at image(s) {owner[bad[:5]].tolist()}, outside the "
            f"{images.shape[0]} images"
        )
    counts = np.bincount(owner, minlength=images.shape[0])
    orphans = np.flatnonzero(counts == 0)
    if orphans.size:
        raise ValueError(
            f"text_to_image: image(s) {orphans[:5].tolist()} have no caption ({orphans.size} in all); every image "
            "needs at least one"
        )
    return images, texts, owner


def _first_position(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """Per row, the 0-based position of its first positive candidate in the stable descending order.

    `positive` (rows, candidates) bool, at least one per row. The first positive is the one with the
    highest score, the lowest index among equals; every candidate scoring higher, or the same at a lower
    index, ranks before it.
    """
    best = np.where(positive, scores, -np.inf).max(axis=1, keepdims=True)
    cols = np.arange(scores.shape[1])
    first = np.where(positive & (scores == best), cols, scores.shape[1]).min(axis=1, keepdims=True)
    before = (scores > best) | ((scores == best) & (cols < first))
    return before.sum(axis=1)


def retrieval_ranks(image_emb, text_emb, text_to_image) -> tuple[np.ndarray, np.ndarray]:
    """(i2t, t2i): 0-based rank of each image's best-ranked own caption, and of each caption's own image.

    A query is retrieved at k exactly when its rank is < k. Inputs as `retrieval_recall`.
    """
    images, texts, owner = _check(image_emb, text_emb, text_to_image)
    n_img, n_txt = images.shape[0], texts.shape[0]
    t2i = np.empty(n_txt, np.int64)
    for lo in range(0, n_txt, _CHUNK):
        hi = min(lo + _CHUNK, n_txt)
        scores = texts[lo:hi] @ images.T  # (captions, images)
        positive = owner[lo:hi, None] == np.arange(n_img)[None, :]
        t2i[lo:hi] = _first_position(scores, positive)
    i2t = np.empty(n_img, np.int64)
    for lo in range(0, n_img, _CHUNK):
        hi = min(lo + _CHUNK, n_img)
        scores = images[lo:hi] @ texts.T  # (images, captions)
        positive = np.arange(lo, hi)[:, None] == owner[None, :]
        i2t[lo:hi] = _first_position(scores, positive)
    return i2t, t2i


def retrieval_recall(image_emb, text_emb, text_to_image, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Image->text and text->image recall@k over one set of images and their captions.

    image_emb (n_images, dim) and text_emb (n_captions, dim): embeddings in one contrastive space
    (normalised here; any positive scale). text_to_image (n_captions,): the index of each caption's
    image; every image needs at least one caption. ks: positive ints (a k at or above the number of
    candidates gives 1.0).

    Returns {"i2t_r{k}": ..., "t2i_r{k}": ...} for every k, fractions in [0, 1]: i2t over the images
    (hit if ANY own caption is in the top k captions), t2i over the captions (hit if the own image is
    in the top k images). Raises ValueError on shapes that do not fit, non-finite or zero embeddings,
    a caption pointing outside the images, an image without captions, or a k < 1.
    """
    ks = list(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise ValueError(f"ks: expected positive integers, got {ks}")
    i2t, t2i = retrieval_ranks(image_emb, text_emb, text_to_image)
    out = {f"i2t_r{k}": float(np.mean(i2t < k)) for k in ks}
    out.update({f"t2i_r{k}": float(np.mean(t2i < k)) for k in ks})
    return out
