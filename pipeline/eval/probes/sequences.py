"""Every probe task as a token sequence, so one autoregressive decoder reads all of them out.

Vocabulary (one table, no text): class tokens [0, C), location tokens [C, C + bins) (one bin per
1/bins of a [0, 1] coordinate), then EOS, then BOS (input only). Per task kind:

- classification:      input [BOS]                 -> target [class]
- box_classification:  input [BOS, x0, y0, x1, y1] -> target at the last position: class
- detection:           input [BOS] + seq[:-1]       -> target seq = (x0 y0 x1 y1 class)* EOS,
                       objects in raster order of their top-left corner (y0, then x0), so the
                       target is a function of the image rather than of annotation order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.eval.probe_data import BOX_CLASSIFICATION, CLASSIFICATION, DETECTION, ProbeSplit

IGNORE = -100  # target of positions that carry no loss (F.cross_entropy's ignore_index)
TOKENS_PER_OBJECT = 5


@dataclass(frozen=True)
class Vocab:
    num_classes: int
    bins: int

    @property
    def loc0(self) -> int:
        return self.num_classes

    @property
    def eos(self) -> int:
        return self.num_classes + self.bins

    @property
    def bos(self) -> int:
        return self.eos + 1

    @property
    def out_size(self) -> int:
        """Tokens the decoder can emit (everything but BOS)."""
        return self.eos + 1

    @property
    def in_size(self) -> int:
        return self.bos + 1


def quantize(coords: np.ndarray, bins: int) -> np.ndarray:
    """[0, 1] coordinates -> bin ids in [0, bins): bin b covers [b/bins, (b+1)/bins)."""
    return np.clip(np.floor(np.asarray(coords, dtype=np.float64) * bins), 0, bins - 1).astype(np.int64)


def dequantize(bin_ids: np.ndarray, bins: int) -> np.ndarray:
    """Bin ids -> bin centres; round trip error is at most 1 / (2 bins) per coordinate."""
    return (np.asarray(bin_ids, dtype=np.float64) + 0.5) / bins


def raster_order(boxes: np.ndarray) -> np.ndarray:
    """Indices sorting boxes by top-left corner (y0, then x0), ties by (y1, x1)."""
    boxes = np.asarray(boxes).reshape(-1, 4)
    return np.lexsort((boxes[:, 2], boxes[:, 3], boxes[:, 0], boxes[:, 1]))


def detection_target(boxes: np.ndarray, labels: np.ndarray, vocab: Vocab, max_objects: int) -> tuple[list[int], int]:
    """(target token list ending in EOS, number of objects dropped beyond `max_objects`)."""
    boxes, labels = np.asarray(boxes).reshape(-1, 4), np.asarray(labels).reshape(-1)
    order = raster_order(boxes)
    kept = order[:max_objects]
    seq: list[int] = []
    for i in kept:
        seq += (vocab.loc0 + quantize(boxes[i], vocab.bins)).tolist() + [int(labels[i])]
    return seq + [vocab.eos], len(order) - len(kept)


@dataclass
class Rows:
    """Teacher-forced training rows: inputs/targets (R, L) and the image each row reads."""

    inputs: np.ndarray  # int64 (R, L), padded with EOS (never attended by earlier positions)
    targets: np.ndarray  # int64 (R, L), IGNORE where there is no loss
    image: np.ndarray  # int64 (R,)
    lengths: np.ndarray  # int64 (R,): positions in use per row
    dropped_objects: int = 0


def box_rows(split: ProbeSplit) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flatten per-image boxes: (image index (R,), boxes (R, 4), labels (R,))."""
    image = np.concatenate(
        [np.full(len(np.asarray(b).reshape(-1, 4)), i, np.int64) for i, b in enumerate(split.boxes)]
        or [np.zeros(0, np.int64)]
    )
    boxes = np.concatenate([np.asarray(b, np.float64).reshape(-1, 4) for b in split.boxes] or [np.zeros((0, 4))])
    labels = np.concatenate([np.asarray(b, np.int64).reshape(-1) for b in split.box_labels] or [np.zeros(0, np.int64)])
    return image, boxes, labels


def box_inputs(boxes: np.ndarray, vocab: Vocab) -> np.ndarray:
    """[BOS, x0, y0, x1, y1] location-token prompts, (R, 5)."""
    bos = np.full((len(boxes), 1), vocab.bos, np.int64)
    return np.concatenate([bos, vocab.loc0 + quantize(boxes, vocab.bins).reshape(-1, 4)], axis=1)


def training_rows(split: ProbeSplit, kind: str, vocab: Vocab, max_objects: int) -> Rows:
    if kind == CLASSIFICATION:
        n = len(split)
        labels = np.asarray(split.labels, np.int64).reshape(n, 1)
        return Rows(np.full((n, 1), vocab.bos, np.int64), labels, np.arange(n), np.ones(n, np.int64))
    if kind == BOX_CLASSIFICATION:
        image, boxes, labels = box_rows(split)
        targets = np.full((len(boxes), TOKENS_PER_OBJECT), IGNORE, np.int64)
        targets[:, -1] = labels
        return Rows(box_inputs(boxes, vocab), targets, image, np.full(len(boxes), TOKENS_PER_OBJECT, np.int64))
    if kind == DETECTION:
        seqs, dropped = [], 0
        for boxes, labels in zip(split.boxes, split.box_labels):
            seq, d = detection_target(boxes, labels, vocab, max_objects)
            seqs.append(seq)
            dropped += d
        length = max(len(s) for s in seqs)
        inputs = np.full((len(seqs), length), vocab.eos, np.int64)
        targets = np.full((len(seqs), length), IGNORE, np.int64)
        for r, seq in enumerate(seqs):
            inputs[r, : len(seq)] = [vocab.bos] + seq[:-1]
            targets[r, : len(seq)] = seq
        return Rows(inputs, targets, np.arange(len(seqs)), np.array([len(s) for s in seqs], np.int64), dropped)
    raise ValueError(f"unknown task kind {kind!r}")
