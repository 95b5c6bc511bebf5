"""Probes and their metrics, on synthetic token sets whose answer is known, and against references.

Every trained-probe test has a control that must fail (shuffled tokens or labels, or a pooled-feature
probe on a task only tokens can solve), so a probe that ignores its input cannot pass.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError, EvalConfig, ProbeConfig, load_config
from pipeline.eval.probe_data import BOX_CLASSIFICATION, CLASSIFICATION, DETECTION, ProbeSplit, TaskInfo
from pipeline.eval.probes import PROBES, ProbeInputError

# steps: the marked-token probes reach top1 ~1.0 in 50; every other user sets its own budget
SMALL = ProbeConfig(width=64, heads=4, decoder_depth=2, steps=50, batch_size=64, lr=3e-3)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread, and other test sessions share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _task(kind: str, n: int) -> TaskInfo:
    return TaskInfo(f"synthetic_{kind}", kind, [f"c{i}" for i in range(n)])


# ------------------------------------------------------------------------------- synthetic token sets


def marked_token_split(n: int, rng, classes: int = 5, tokens: int = 8, noise_dims: int = 10) -> ProbeSplit:
    """The class is a one-hot in the one *marked* token, at a random position; every other token
    carries a random distractor class. Mean pooling mixes them, attention can pick the marked one."""
    dim = 1 + classes + noise_dims
    x = rng.normal(scale=0.1, size=(n, tokens, dim)).astype(np.float32)
    labels = rng.integers(0, classes, n)
    x[np.arange(n)[:, None], np.arange(tokens)[None], 1 + rng.integers(0, classes, (n, tokens))] += 1.0
    where = rng.integers(0, tokens, n)
    x[np.arange(n), where, 1:] = rng.normal(scale=0.1, size=(n, dim - 1))
    x[np.arange(n), where, 0] += 1.0
    x[np.arange(n), where, 1 + labels] += 1.0
    return ProbeSplit(pooled=x.mean(1), tokens=x, labels=labels)


def grid_split(n: int, rng, side: int = 4, classes: int = 4, boxes_per_image: int = 3) -> ProbeSplit:
    """A side x side grid of tokens; each token = its row and column one-hots + the class one-hot of
    the object in that cell. The queried boxes are cells, so only the queried cell says the answer."""
    dim = 2 * side + classes
    cell_class = rng.integers(0, classes, (n, side * side))
    x = rng.normal(scale=0.1, size=(n, side * side, dim)).astype(np.float32)
    rows, cols = np.divmod(np.arange(side * side), side)
    x[:, np.arange(side * side), rows] += 1.0
    x[:, np.arange(side * side), side + cols] += 1.0
    x[np.arange(n)[:, None], np.arange(side * side)[None], 2 * side + cell_class] += 1.0
    boxes, labels = [], []
    for i in range(n):
        cells = rng.choice(side * side, boxes_per_image, replace=False)
        r, c = np.divmod(cells, side)
        boxes.append(
            np.stack([c / side + 0.02, r / side + 0.02, (c + 1) / side - 0.02, (r + 1) / side - 0.02], 1).astype(
                np.float32
            )
        )
        labels.append(cell_class[i, cells])
    return ProbeSplit(pooled=x.mean(1), tokens=x, boxes=boxes, box_labels=labels)


def patch_grid_split(n: int, rng, side: int = 6, classes: int = 4, boxes_per_image: int = 2) -> ProbeSplit:
    """A ViT's token layout (one prefix token, then a side x side grid of patches in raster order) whose
    tokens say *what* is in their cell but not *where* the cell is: only the token order does. The
    queried boxes are cells, so a probe must learn which token a box covers."""
    dim = classes + 6
    x = rng.normal(scale=0.1, size=(n, 1 + side * side, dim)).astype(np.float32)
    cell_class = rng.integers(0, classes, (n, side * side))
    x[np.arange(n)[:, None], 1 + np.arange(side * side)[None], cell_class] += 1.0
    boxes, labels = [], []
    for i in range(n):
        cells = rng.choice(side * side, boxes_per_image, replace=False)
        r, c = np.divmod(cells, side)
        boxes.append(np.stack([c / side, r / side, (c + 1) / side, (r + 1) / side], 1).astype(np.float32))
        labels.append(cell_class[i, cells])
    return ProbeSplit(pooled=x.mean(1), tokens=x, boxes=boxes, box_labels=labels)


def slot_detection_split(n: int, rng, bins: int = 8, classes: int = 3, slots: int = 3) -> ProbeSplit:
    """0..slots objects per image; object k in raster order is written into token k: a slot one-hot,
    a 'present' flag, one one-hot per quantised coordinate and the class one-hot. Boxes sit on bin
    centres, so a decoder that copies the right token reproduces them exactly (IoU 1)."""
    dim = slots + 1 + 4 * bins + classes
    x = rng.normal(scale=0.1, size=(n, slots, dim)).astype(np.float32)
    x[:, np.arange(slots), np.arange(slots)] += 1.0
    boxes, labels = [], []
    for i in range(n):
        k = int(rng.integers(0, slots + 1))
        lo = rng.integers(0, bins - 1, (k, 2))
        hi = lo + 1 + (rng.random((k, 2)) * (bins - 1 - lo)).astype(int)
        b = np.concatenate([lo, hi], 1)
        frac = (b + 0.5) / bins
        lab = rng.integers(0, classes, k)
        order = np.lexsort((frac[:, 2], frac[:, 3], frac[:, 0], frac[:, 1]))  # raster: y0, then x0
        b, frac, lab = b[order], frac[order], lab[order]
        for s in range(k):
            x[i, s, slots] += 1.0
            x[i, s, slots + 1 + np.arange(4) * bins + b[s]] += 1.0
            x[i, s, slots + 1 + 4 * bins + lab[s]] += 1.0
        boxes.append(frac.astype(np.float32))
        labels.append(lab.astype(np.int64))
    return ProbeSplit(pooled=x.mean(1), tokens=x, boxes=boxes, box_labels=labels)


def _shuffle_tokens(split: ProbeSplit, rng) -> ProbeSplit:
    perm = rng.permutation(len(split))
    return dataclasses.replace(split, tokens=split.tokens[perm], pooled=split.pooled[perm])


# ------------------------------------------------------------------------------------------ metrics


def test_topk_accuracy_matches_sklearn():
    from sklearn.metrics import top_k_accuracy_score

    from pipeline.metrics import classification_metrics

    rng = np.random.default_rng(0)
    scores, labels = rng.normal(size=(200, 9)), rng.integers(0, 9, 200)
    got = classification_metrics(scores, labels, 9)
    assert got["top1"] == pytest.approx(top_k_accuracy_score(labels, scores, k=1, labels=range(9)))
    assert got["top5"] == pytest.approx(top_k_accuracy_score(labels, scores, k=5, labels=range(9)))
    assert "top5" not in classification_metrics(scores[:, :4], labels % 4, 4)


def test_coco_map_matches_hand_computed_ap():
    """One class, two images, one object each. Detections by score: A hits gt 1 (IoU 1), B is a
    false positive, C overlaps gt 2 with IoU 0.64 (a TP for IoU thresholds .50/.55/.60 only).
    COCO AP is the mean over 101 recall points of the precision envelope:
      C matched:   P = 1 for recall <= .5 (51 points), 2/3 for recall in (.5, 1] (50 points)
      C unmatched: P = 1 for recall <= .5 (51 points), 0 above."""
    from pipeline.metrics import coco_map

    gt = [np.array([[0.1, 0.1, 0.3, 0.3]]), np.array([[0.5, 0.5, 0.9, 0.9]])]
    c_box = np.array([0.5, 0.5, 0.9, 0.756])  # inside gt 2: IoU = (0.4 * 0.256) / (0.4 * 0.4) = 0.64
    preds = [np.array([[0.1, 0.1, 0.3, 0.3], [0.6, 0.0, 0.7, 0.05]]), c_box[None]]
    scores = [np.array([0.9, 0.8]), np.array([0.7])]
    labels = [np.zeros(2, int), np.zeros(1, int)]
    matched, unmatched = (51 + 50 * 2 / 3) / 101, 51 / 101
    got = coco_map(gt, [np.zeros(1, int)] * 2, preds, labels, scores, num_classes=1)
    assert got["map50"] == pytest.approx(matched, abs=1e-6)
    assert got["map75"] == pytest.approx(unmatched, abs=1e-6)
    assert got["map"] == pytest.approx((3 * matched + 7 * unmatched) / 10, abs=1e-6)
    # a detection labelled with the wrong class matches nothing
    wrong = coco_map(gt, [np.zeros(1, int)] * 2, preds, [np.ones(2, int), np.ones(1, int)], scores, num_classes=2)
    assert wrong["map"] == 0.0


def test_coco_map_edge_cases():
    from pipeline.metrics import coco_map

    gt, gl = [np.array([[0.1, 0.1, 0.3, 0.3]]), np.zeros((0, 4))], [np.zeros(1, int), np.zeros(0, int)]
    none = [np.zeros((0, 4))] * 2
    assert coco_map(gt, gl, none, [np.zeros(0, int)] * 2, [np.zeros(0)] * 2, 2) == {
        "map": 0.0,
        "map50": 0.0,
        "map75": 0.0,
    }
    with pytest.raises(ValueError, match="no ground-truth boxes"):
        coco_map(none, [np.zeros(0, int)] * 2, gt, gl, [np.ones(1), np.zeros(0)], 2)
    with pytest.raises(ValueError, match="one entry per image"):
        coco_map(gt, gl, none[:1], gl, gl, 2)


def test_rankme_matches_numpy_reference():
    from pipeline.metrics import rankme

    def reference(z):  # singular values as square roots of the Gram matrix's eigenvalues
        s = np.sqrt(np.clip(np.linalg.eigvalsh(z.T @ z), 0, None))[::-1][: min(z.shape)]
        p = s / s.sum() + 1e-7
        return float(np.exp(-(p * np.log(p)).sum()))

    rng = np.random.default_rng(0)
    z = rng.normal(size=(300, 24)) * np.linspace(0.1, 3, 24)
    assert rankme(z) == pytest.approx(reference(z), rel=1e-6)
    ortho = np.linalg.qr(rng.normal(size=(50, 7)))[0] * 3.0  # 7 equal singular values
    assert rankme(ortho) == pytest.approx(7.0, rel=1e-5)
    assert rankme(np.outer(rng.normal(size=40), rng.normal(size=10))) == pytest.approx(1.0, rel=1e-4)
    assert rankme(np.zeros((5, 3))) == 0.0


# ------------------------------------------------------------------------------- token sequences


def test_box_quantisation_round_trip():
    from pipeline.eval.probes.sequences import dequantize, quantize

    rng = np.random.default_rng(0)
    for bins in (4, 100, 1000):
        x = rng.random(10_000)
        back = dequantize(quantize(x, bins), bins)
        assert np.abs(back - x).max() <= 0.5 / bins + 1e-12
        centres = (np.arange(bins) + 0.5) / bins
        np.testing.assert_array_equal(quantize(centres, bins), np.arange(bins))  # bin centres are fixed points
        np.testing.assert_array_equal(quantize(dequantize(np.arange(bins), bins), bins), np.arange(bins))
        assert quantize(np.array([0.0, 1.0]), bins).tolist() == [0, bins - 1]


def test_detection_target_is_raster_ordered_and_counts_dropped_objects():
    from pipeline.eval.probes.sequences import Vocab, detection_target, training_rows

    vocab = Vocab(num_classes=3, bins=10)  # classes 0..2, locations 3..12, EOS 13, BOS 14
    boxes = np.array([[0.55, 0.61, 0.9, 0.9], [0.05, 0.12, 0.3, 0.4], [0.7, 0.12, 0.8, 0.2]])
    labels = np.array([2, 0, 1])
    full, dropped = detection_target(boxes, labels, vocab, max_objects=5)
    # raster order: box 1 (y0 .12, x0 .05), box 2 (y0 .12, x0 .7), box 0 (y0 .61); location = 3 + bin
    assert dropped == 0
    assert full == [3 + 0, 3 + 1, 3 + 3, 3 + 4, 0, 3 + 7, 3 + 1, 3 + 8, 3 + 2, 1, 3 + 5, 3 + 6, 3 + 9, 3 + 9, 2, 13]
    seq, dropped = detection_target(boxes, labels, vocab, max_objects=1)
    assert (seq, dropped) == ([3, 4, 6, 7, 0, 13], 2)
    split = ProbeSplit(pooled=np.zeros((2, 4)), boxes=[boxes, np.zeros((0, 4))], box_labels=[labels, np.zeros(0, int)])
    rows = training_rows(split, DETECTION, vocab, max_objects=5)
    assert rows.inputs[0].tolist() == [14] + full[:-1] and rows.targets[0].tolist() == full
    assert rows.targets[1].tolist() == [13] + [-100] * 15 and rows.lengths.tolist() == [16, 1]


def test_decoding_is_well_formed_for_any_weights():
    """Greedy decoding with an untrained decoder, one forced to always stop and one forced never to
    stop: every output is a valid (box, class, score) list of at most max_objects."""
    from pipeline.eval.probes.decoder import build_decoder, decode_detections
    from pipeline.eval.probes.sequences import Vocab

    cfg = EvalConfig(probe=ProbeConfig(width=32, heads=2, decoder_depth=1, coord_bins=16, max_objects=4))
    vocab = Vocab(5, 16)
    tokens = torch.randn(6, 7, 12)
    model = build_decoder(12, vocab, DETECTION, cfg).eval()
    for eos_bias, expect in ((0.0, None), (1e4, 0), (-1e4, 4)):
        with torch.no_grad():
            model.head.bias[vocab.eos] = eos_bias
        out = decode_detections(model, tokens, vocab, max_objects=4)
        assert len(out) == 6
        for boxes, labels, scores in out:
            assert boxes.shape == (len(labels), 4) and scores.shape == labels.shape and len(labels) <= 4
            assert ((boxes >= 0) & (boxes <= 1)).all() and (boxes[:, 2:] >= boxes[:, :2]).all()
            assert ((labels >= 0) & (labels < 5)).all() and ((scores > 0) & (scores <= 1)).all()
            if expect is not None:
                assert len(labels) == expect


# ---------------------------------------------------------------------------------- trained probes


def test_knn_and_linear_read_pooled_features():
    rng = np.random.default_rng(1)
    centres = rng.normal(scale=4.0, size=(5, 32))
    y = rng.integers(0, 5, 600)
    x = (centres[y] + rng.normal(size=(600, 32))).astype(np.float32)
    train, test = ProbeSplit(pooled=x[:400], labels=y[:400]), ProbeSplit(pooled=x[400:], labels=y[400:])
    cfg = EvalConfig(linear_epochs=100)
    assert PROBES["knn"](train, test, _task(CLASSIFICATION, 5), cfg)["top1"] > 0.95
    assert PROBES["linear"](train, test, _task(CLASSIFICATION, 5), cfg)["top1"] > 0.95
    noise = dataclasses.replace(train, labels=rng.permutation(train.labels))
    assert PROBES["linear"](noise, test, _task(CLASSIFICATION, 5), cfg)["top1"] < 0.4  # chance 0.2


def test_attentive_and_decoder_find_the_marked_token():
    """Only the marked token says the class: token probes solve it, the pooled linear probe cannot."""
    rng = np.random.default_rng(2)
    train, test = marked_token_split(800, rng), marked_token_split(200, rng)
    task, cfg = _task(CLASSIFICATION, 5), EvalConfig(probe=SMALL, linear_epochs=100)
    attentive = PROBES["attentive"](train, test, task, cfg)
    decoder = PROBES["decoder"](train, test, task, cfg)
    linear = PROBES["linear"](train, test, task, cfg)
    print({"attentive": attentive, "decoder": decoder, "linear": linear})
    assert attentive["top1"] > 0.9 and decoder["top1"] > 0.9, (attentive, decoder)
    assert linear["top1"] < attentive["top1"] - 0.25, linear
    shuffled = PROBES["attentive"](_shuffle_tokens(train, rng), test, task, cfg)
    assert shuffled["top1"] < 0.4, shuffled  # chance 0.2


def test_decoder_box_classification_reads_the_queried_cell():
    rng = np.random.default_rng(3)
    train, test = grid_split(600, rng), grid_split(100, rng)
    cfg = EvalConfig(probe=dataclasses.replace(SMALL, coord_bins=4, steps=100, lr=6e-3))  # ~1.0 from 100 steps up
    task = _task(BOX_CLASSIFICATION, 4)
    good = PROBES["decoder"](train, test, task, cfg)
    print(good)
    assert good["top1"] > 0.9 and good["n_boxes"] == 300, good
    shuffled = PROBES["decoder"](_shuffle_tokens(train, rng), test, task, cfg)
    assert shuffled["top1"] < 0.45, shuffled  # chance 0.25


def test_decoder_geometry_lets_a_box_find_its_patch_in_a_short_budget():
    """Patch tokens that carry no position: with `geometry` (the default) the box's location tokens and
    the patches share Fourier features of where they are, and a short budget finds the queried patch;
    without it the probe must learn what each of 100 bins means from scratch, and does not in that budget."""
    rng = np.random.default_rng(7)
    train, test = patch_grid_split(1500, rng), patch_grid_split(200, rng)
    task = _task(BOX_CLASSIFICATION, 4)
    # one decoder layer: the same ~400-step search with geometry, at 2/3 of the cost per step
    cfg = EvalConfig(probe=dataclasses.replace(SMALL, decoder_depth=1, steps=400))
    assert ProbeConfig().geometry and cfg.probe.coord_bins == 100
    with_geometry = PROBES["decoder"](train, test, task, cfg)
    without = PROBES["decoder"](
        train, test, task, dataclasses.replace(cfg, probe=dataclasses.replace(cfg.probe, geometry=False))
    )
    print(with_geometry, without)
    assert with_geometry["top1"] > 0.9, with_geometry
    assert without["top1"] < with_geometry["top1"] - 0.3, without  # chance 0.25


def test_decoder_detection_reaches_high_map_only_from_the_right_tokens():
    from pipeline.eval.probes.decoder import evaluate_decoder, fit_decoder

    rng = np.random.default_rng(4)
    train, test = slot_detection_split(2000, rng), slot_detection_split(100, rng)
    # half the steps at a higher lr: map as high as 400 steps at 3e-3
    cfg = EvalConfig(probe=dataclasses.replace(SMALL, coord_bins=8, max_objects=3, steps=200, lr=1e-2))
    task = _task(DETECTION, 3)
    model, vocab, dropped, _ = fit_decoder(train, task, cfg)
    good = evaluate_decoder(model, vocab, test, task, cfg)
    print(good)
    assert good["map"] > 0.85 and good["map50"] >= good["map"], good
    assert good["pred_per_image"] == pytest.approx(good["gt_per_image"], abs=0.1)
    assert dropped == 0 and good["test_objects_over_max"] == 0
    # the same trained probe reading other images' tokens cannot place the boxes
    blind = evaluate_decoder(model, vocab, _shuffle_tokens(test, rng), task, cfg)
    assert blind["map"] < 0.15, blind


def test_decoder_probe_detection_end_to_end_counts_dropped_objects():
    """Through the registry with a tiny budget: the metric keys, and objects beyond max_objects counted."""
    rng = np.random.default_rng(6)
    train, test = slot_detection_split(40, rng, slots=3), slot_detection_split(10, rng, slots=3)
    cfg = EvalConfig(probe=dataclasses.replace(SMALL, coord_bins=8, max_objects=1, steps=5))
    got = PROBES["decoder"](train, test, _task(DETECTION, 3), cfg)
    over = sum(max(len(b) - 1, 0) for b in train.boxes)
    assert over > 0 and got["train_objects_dropped"] == over
    assert got["test_objects_over_max"] == sum(max(len(b) - 1, 0) for b in test.boxes)
    assert (
        set(got) >= {"map", "map50", "map75", "train_loss", "pred_per_image", "gt_per_image"}
        and got["pred_per_image"] <= 1
    )


def test_rankme_probe_is_label_free_and_sees_collapse():
    rng = np.random.default_rng(5)
    split = slot_detection_split(50, rng)
    unlabelled = dataclasses.replace(split, boxes=None, box_labels=None)
    spread = PROBES["rankme"](unlabelled, unlabelled, _task(DETECTION, 3), EvalConfig())
    collapsed = ProbeSplit(pooled=np.outer(rng.normal(size=50), rng.normal(size=16)).astype(np.float32))
    flat = PROBES["rankme"](collapsed, collapsed, TaskInfo("any", CLASSIFICATION, []), EvalConfig())
    assert spread["rankme"] > 5 * flat["rankme"] and flat["rankme"] == pytest.approx(1.0, rel=1e-3)
    assert 0 < spread["rankme_fraction"] <= 1


# ---------------------------------------------------------------------------------------- bad inputs


def _bad(field: str, value):
    """A valid 4-image detection split with one field replaced."""
    boxes = [np.array([[0.1, 0.1, 0.5, 0.5]], np.float32)] * 4
    good = ProbeSplit(
        pooled=np.ones((4, 8), np.float32),
        tokens=np.ones((4, 3, 8), np.float32),
        labels=np.arange(4) % 2,
        boxes=boxes,
        box_labels=[np.zeros(1, np.int64)] * 4,
    )
    return good, dataclasses.replace(good, **{field: value})


@pytest.mark.parametrize(
    "probe,kind,field,value,match",
    [
        ("decoder", DETECTION, "tokens", None, r"test\.tokens.*tokens=None"),
        ("attentive", CLASSIFICATION, "tokens", np.ones((3, 3, 8), np.float32), r"test\.tokens: expected \(4, T, D\)"),
        ("linear", CLASSIFICATION, "labels", np.array([0, 1, 2, 1]), r"test\.labels\[2\]: class id 2 outside \[0, 2\)"),
        ("knn", CLASSIFICATION, "labels", None, r"test\.labels: a classification task needs"),
        (
            "knn",
            CLASSIFICATION,
            "labels",
            np.array(["a", "b", "a", "b"]),
            r"test\.labels: expected \(4,\) integer class ids",
        ),
        (
            "decoder",
            DETECTION,
            "boxes",
            [np.array([[0.1, 0.1, 1.5, 0.5]], np.float32)] * 4,
            r"test\.boxes\[0\]: coordinates must be finite and in",
        ),
        (
            "decoder",
            BOX_CLASSIFICATION,
            "boxes",
            [np.array([[0.5, 0.1, 0.5, 0.5]], np.float32)] * 4,
            r"test\.boxes\[0\]\[0\]: empty box",
        ),
        (
            "decoder",
            DETECTION,
            "boxes",
            [np.zeros((1, 4))] * 3,
            r"test\.boxes: 3 box arrays and 4 label arrays for 4 images",
        ),
        (
            "decoder",
            DETECTION,
            "box_labels",
            [np.array([5])] * 4,
            r"test\.box_labels\[0\]: class ids must be integers in \[0, 2\)",
        ),
        ("rankme", DETECTION, "pooled", np.full((4, 8), np.nan, np.float32), r"test\.pooled: 4 rows hold NaN/inf"),
        ("knn", CLASSIFICATION, "pooled", np.ones((4, 5), np.float32), r"pooled: train has 8 features, test 5"),
        ("knn", DETECTION, "labels", None, r"this probe handles classification, not detection"),
        ("rankme", "segmentation", "labels", None, r"task\.kind: unknown kind 'segmentation'"),
    ],
)
def test_bad_inputs_name_the_field(probe, kind, field, value, match):
    train, test = _bad(field, value)
    with pytest.raises(ProbeInputError, match=match) as info:
        PROBES[probe](train, test, TaskInfo("t", kind, ["a", "b"]), EvalConfig(probe=ProbeConfig(steps=1)))
    assert f"probe '{probe}' on task 't'" in str(info.value)


@pytest.mark.parametrize(
    "override,match",
    [
        ({"heads": 3}, r"eval\.probe\.width=128 must be divisible by eval\.probe\.heads=3"),
        ({"steps": 0}, r"eval\.probe\.steps: must be >= 1"),
        ({"coord_bins": 1}, r"eval\.probe\.coord_bins"),
    ],
)
def test_bad_probe_settings_name_the_key(override, match):
    split = marked_token_split(8, np.random.default_rng(0))
    with pytest.raises(ConfigError, match=match):
        PROBES["attentive"](split, split, _task(CLASSIFICATION, 5), EvalConfig(probe=ProbeConfig(**override)))


def test_detection_needs_training_objects():
    empty = [np.zeros((0, 4), np.float32)] * 4
    split = ProbeSplit(
        pooled=np.ones((4, 8), np.float32),
        tokens=np.ones((4, 3, 8), np.float32),
        boxes=empty,
        box_labels=[np.zeros(0, np.int64)] * 4,
    )
    with pytest.raises(ProbeInputError, match="train.boxes: no objects in the training split"):
        PROBES["decoder"](split, split, TaskInfo("t", DETECTION, ["a", "b"]), EvalConfig())


def test_registry_and_probe_config():
    assert {name: (p.kinds, p.needs_tokens) for name, p in PROBES.items() if name in ("knn", "decoder")} == {
        "knn": ((CLASSIFICATION,), False),
        "decoder": ((CLASSIFICATION, BOX_CLASSIFICATION, DETECTION), True),
    }
    assert PROBES["attentive"].needs_tokens and set(PROBES["rankme"].kinds) == {
        CLASSIFICATION,
        BOX_CLASSIFICATION,
        DETECTION,
    }
    cfg = load_config(overrides=["eval.probe.steps=7", "eval.probe.decoder_depth=4"])
    assert (cfg.eval.probe.steps, cfg.eval.probe.decoder_depth, cfg.eval.knn_k) == (7, 4, 20)
    with pytest.raises(ConfigError, match="eval.probe.nope"):
        load_config(overrides=["eval.probe.nope=1"])
    assert ProbeConfig.paper_scale().decoder_depth == 4


def test_box_linear_pools_the_patches_whose_centres_lie_in_the_box():
    """The box-linear probe's pooling (benchmarks/box_roi_probe.py's too): a prefix token, a 3x3 grid, raster order."""
    from pipeline.eval.probes.box_linear import roi_features

    grid = np.arange(9, dtype=np.float32).reshape(9, 1) * np.array([[1.0, 10.0]], np.float32)  # patch i = (i, 10 i)
    tokens = np.concatenate([np.full((1, 2), -100.0, np.float32), grid])[None]  # the prefix must never be pooled
    boxes = [
        np.array(
            [
                [0.0, 0.0, 1.0, 1.0],  # every patch: mean of 0..8
                [0.0, 0.0, 0.45, 0.45],  # centre (1/6, 1/6) only (1/2 is outside): patch 0
                [0.5, 0.0, 1.0, 0.4],  # top row, x centres 1/2 and 5/6: patches 1, 2
                [0.0, 0.5, 0.4, 1.0],  # left column, y centres 1/2 and 5/6: patches 3, 6
                [0.9, 0.9, 0.95, 0.95],  # no centre inside: the nearest patch, 8
            ],
            np.float32,
        )
    ]
    got = roi_features(tokens, boxes)
    np.testing.assert_allclose(got[:, 0], [4.0, 0.0, 1.5, 4.5, 8.0])
    np.testing.assert_allclose(got[:, 1], 10 * got[:, 0])
    assert roi_features(tokens, [np.zeros((0, 4), np.float32)]).shape == (0, 2)


def _box_split(rng, n_images: int, n_classes: int, codes: np.ndarray) -> ProbeSplit:
    """4x4 patch grids of noise; each image's two objects write their class's code into the patches of
    their box (one quadrant each), and the pooled feature is noise: only the box's patches say the class."""
    quadrants = np.array([[0, 0, 0.5, 0.5], [0.5, 0, 1, 0.5], [0, 0.5, 0.5, 1], [0.5, 0.5, 1, 1]], np.float32)
    tokens = rng.normal(size=(n_images, 17, codes.shape[1])).astype(np.float32)  # a class token + 16 patches
    boxes, labels = [], []
    for i in range(n_images):
        where = rng.choice(4, size=2, replace=False)
        classes = rng.integers(0, n_classes, size=2)
        for q, c in zip(where, classes):
            rows, cols = divmod(int(q), 2)
            for r in range(2 * rows, 2 * rows + 2):
                for col in range(2 * cols, 2 * cols + 2):
                    tokens[i, 1 + 4 * r + col] += codes[c]
        boxes.append(quadrants[where])
        labels.append(classes.astype(np.int64))
    return ProbeSplit(
        pooled=rng.normal(size=(n_images, codes.shape[1])).astype(np.float32),
        tokens=tokens,
        boxes=boxes,
        box_labels=labels,
    )


def test_box_linear_reads_the_class_in_the_box_as_a_reference_logistic_regression_does():
    from sklearn.linear_model import LogisticRegression

    from pipeline.eval.probes.box_linear import roi_features

    rng = np.random.default_rng(0)
    codes = rng.normal(size=(4, 16)).astype(np.float32) * 0.7
    train, test = _box_split(rng, 150, 4, codes), _box_split(rng, 100, 4, codes)
    info = TaskInfo("boxes", BOX_CLASSIFICATION, ["a", "b", "c", "d"])
    cfg = EvalConfig(linear_epochs=200, box_linear_epochs=200)  # these boxes fit in 200 (default 1500)
    got = PROBES["box_linear"](train, test, info, cfg)
    assert got["n_boxes"] == 200
    reference = LogisticRegression(max_iter=2000).fit(
        roi_features(train.tokens, train.boxes), np.concatenate(train.box_labels)
    )
    ref_top1 = reference.score(roi_features(test.tokens, test.boxes), np.concatenate(test.box_labels))
    assert ref_top1 > 0.9 and abs(got["top1"] - ref_top1) < 0.05, (got, ref_top1)
    # each image's two boxes swapped: a label now pools the other object's patches, and reads near chance
    swapped = dataclasses.replace(test, boxes=[b[::-1] for b in test.boxes])
    assert PROBES["box_linear"](train, swapped, info, cfg)["top1"] < 0.45
