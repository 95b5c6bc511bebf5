"""Image-text retrieval recall@k (pipeline/eval/retrieval.py): hand-computed ranks, a brute-force
reference over argsort, and the input checks. Pure numpy, no Ray."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.eval import retrieval
from pipeline.eval.retrieval import retrieval_ranks, retrieval_recall

# 4 images, 2 captions each. Images are the first 4 unit vectors of R^5; each caption is a row of
# SCORES padded in the 5th coordinate to unit norm, so caption j scores exactly SCORES[j, i] against
# image i (cosine similarity), and the ranks below follow by reading the table.
OWNER = np.array([0, 0, 1, 1, 2, 2, 3, 3])
SCORES = np.array(
    [
        [0.9, 0.1, 0.0, 0.0],  # c0 (img 0): img 0 first                      -> t2i rank 0
        [0.2, 0.5, 0.1, 0.0],  # c1 (img 0): img 1, then img 0                -> 1
        [0.0, 0.8, 0.0, 0.1],  # c2 (img 1): img 1 first                      -> 0
        [0.3, 0.4, 0.6, 0.0],  # c3 (img 1): img 2, img 1                     -> 1
        [0.6, 0.0, 0.3, 0.5],  # c4 (img 2): img 0, img 3, img 2              -> 2
        [0.1, 0.2, 0.4, 0.7],  # c5 (img 2): img 3, img 2                     -> 1
        [0.7, 0.1, 0.0, 0.2],  # c6 (img 3): img 0, img 3                     -> 1
        [0.0, 0.0, 0.0, 0.3],  # c7 (img 3): img 3 first                      -> 0
    ]
)
# i2t, read down each column: img 0: c0 (.9) first -> 0; img 1: c2 (.8) first -> 0;
# img 2: c3 (.6), c5 (.4, own) -> 1, its other caption c4 (.3) only at 2;
# img 3: c5 (.7), c4 (.5), c7 (.3, own) -> 2, its other caption c6 (.2) at 3.
T2I_RANKS = [0, 1, 0, 1, 2, 1, 1, 0]
I2T_RANKS = [0, 0, 1, 2]


def hand_built(image_scale=(1.0, 1.0, 1.0, 1.0), text_scale=None):
    images = np.eye(4, 5) * np.asarray(image_scale)[:, None]
    pad = np.sqrt(1.0 - (SCORES**2).sum(1, keepdims=True))
    texts = np.concatenate([SCORES, pad], axis=1)
    if text_scale is not None:
        texts = texts * np.asarray(text_scale)[:, None]
    return images, texts


def test_hand_built_ranks_and_recalls():
    images, texts = hand_built()
    i2t, t2i = retrieval_ranks(images, texts, OWNER)
    assert i2t.tolist() == I2T_RANKS
    assert t2i.tolist() == T2I_RANKS
    got = retrieval_recall(images, texts, OWNER, ks=(1, 2, 3))
    assert got == {
        "i2t_r1": 0.5,  # imgs 0, 1
        "i2t_r2": 0.75,  # + img 2, through c5 (ANY caption: its other caption c4 is only 3rd)
        "i2t_r3": 1.0,  # + img 3
        "t2i_r1": 3 / 8,  # c0, c2, c7
        "t2i_r2": 7 / 8,  # all but c4
        "t2i_r3": 1.0,
    }


def test_hand_built_embeddings_are_normalised():
    # scaled images reorder t2i, scaled captions reorder i2t, unless both are L2-normalised first
    images, texts = hand_built(image_scale=(0.2, 3.0, 1.5, 7.0), text_scale=[5, 0.1, 2, 9, 0.3, 1, 4, 0.7])
    i2t, t2i = retrieval_ranks(images.astype(np.float32), texts.astype(np.float32), OWNER)
    assert i2t.tolist() == I2T_RANKS
    assert t2i.tolist() == T2I_RANKS


def test_default_ks_and_large_k():
    images, texts = hand_built()
    got = retrieval_recall(images, texts, OWNER)
    assert sorted(got) == sorted(f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10))
    # 4 images and 8 captions: every k >= 5 finds everything
    assert got["i2t_r1"] == 0.5 and got["t2i_r1"] == 3 / 8
    assert all(got[f"{d}_r{k}"] == 1.0 for d in ("i2t", "t2i") for k in (5, 10))


def test_ties_break_by_index():
    # every embedding the same: the stable order lists candidates by index
    images, texts = np.ones((3, 4)), np.ones((4, 4))
    owner = np.array([2, 0, 1, 2])
    i2t, t2i = retrieval_ranks(images, texts, owner)
    assert t2i.tolist() == [2, 0, 1, 2]  # a caption's image sits at its own index
    assert i2t.tolist() == [1, 2, 0]  # an image's first caption's index


def brute_force(images, texts, owner, ks):
    """Per query: sort the candidates (stable, highest score first) and look for a positive in the top k."""
    images = images / np.linalg.norm(images, axis=1, keepdims=True)
    texts = texts / np.linalg.norm(texts, axis=1, keepdims=True)
    out = {}
    for k in ks:
        hits = 0
        for j in range(len(texts)):
            order = np.argsort(-(images @ texts[j]), kind="stable")
            hits += int(owner[j] in order[:k].tolist())
        out[f"t2i_r{k}"] = hits / len(texts)
        hits = 0
        for i in range(len(images)):
            order = np.argsort(-(texts @ images[i]), kind="stable")
            hits += int(any(owner[j] == i for j in order[:k]))
        out[f"i2t_r{k}"] = hits / len(images)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_with_uneven_captions(seed, monkeypatch):
    monkeypatch.setattr(retrieval, "_CHUNK", 7)  # several chunks per direction
    rng = np.random.default_rng(seed)
    n_images, dim = 37, 6
    per_image = rng.integers(1, 7, size=n_images)  # 1..6 captions per image
    owner = rng.permutation(np.repeat(np.arange(n_images), per_image))
    images = rng.normal(size=(n_images, dim)).astype(np.float32) * rng.uniform(0.1, 5, size=(n_images, 1))
    # captions near their image, so recalls sit between 0 and 1 rather than at chance
    texts = images[owner] + rng.normal(scale=1.5, size=(len(owner), dim)).astype(np.float32)
    ks = (1, 3, 5, 10)
    got = retrieval_recall(images, texts, owner, ks=ks)
    want = brute_force(images.astype(np.float64), texts.astype(np.float64), owner, ks)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key
    assert 0 < got["t2i_r1"] < 1 and 0 < got["i2t_r1"] < 1
    assert all(got[f"{d}_r1"] <= got[f"{d}_r5"] <= got[f"{d}_r10"] for d in ("i2t", "t2i"))


def _valid():
    images, texts = hand_built()
    return images, texts, OWNER.copy()


def _case(**change):
    images, texts, owner = _valid()
    return {"image_emb": images, "text_emb": texts, "text_to_image": owner, **change}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (_case(image_emb=np.ones(5)), "image_emb: expected a non-empty 2-D"),
        (_case(text_emb=np.ones((8, 5, 1))), "text_emb: expected a non-empty 2-D"),
        (_case(image_emb=np.zeros((0, 5))), "image_emb: expected a non-empty 2-D"),
        (_case(text_emb=np.ones((8, 4))), "must share one embedding space"),
        (_case(text_to_image=OWNER[:-1]), r"one image index per caption, shape \(8,\)"),
        (_case(text_to_image=OWNER.astype(np.float64)), "integer image indices"),
        (_case(text_to_image=np.array([0, 0, 1, 1, 2, 2, 3, 4])), r"caption\(s\) \[7\] point at image\(s\) \[4\]"),
        (_case(text_to_image=np.array([0, 0, 1, 1, 2, 2, 3, -1])), r"caption\(s\) \[7\]"),
        (_case(text_to_image=np.array([0, 0, 1, 1, 1, 1, 3, 3])), r"image\(s\) \[2\] have no caption"),
        (_case(image_emb=np.eye(4, 5) * np.array([[1], [0], [1], [1]])), r"image_emb: row\(s\) \[1\] have zero norm"),
        (_case(text_emb=np.full((8, 5), np.nan)), "text_emb: contains NaN"),
        (_case(ks=(1, 0)), "ks: expected positive integers"),
        (_case(ks=(1.5,)), "ks: expected positive integers"),
        (_case(ks=()), "ks: expected positive integers"),
    ],
)
def test_invalid_inputs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        retrieval_recall(**kwargs)
