"""Decoder probe (Beyer et al. 2023; AB paper appendix A.1): a small autoregressive transformer
decoder that cross-attends to the frozen ViT's final tokens and writes each task's answer as tokens.

One probe is trained per task (as in the AB paper, unlike Beyer et al.'s multi-task mixture), with
teacher forcing; test answers are decoded greedily, restricted at every position to the tokens the
task's grammar allows there (pipeline.eval.probes.sequences), so every decoded detection sequence
is well formed: (4 location tokens, 1 class token)* then EOS.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import EvalConfig
from pipeline.eval.probe_data import BOX_CLASSIFICATION, CLASSIFICATION, DETECTION, ProbeSplit, TaskInfo
from pipeline.eval.probes.base import Probe
from pipeline.eval.probes.sequences import (
    IGNORE,
    TOKENS_PER_OBJECT,
    Vocab,
    box_inputs,
    box_rows,
    dequantize,
    training_rows,
)
from pipeline.eval.probes.training import as_float_tensor, probe_device, train_probe
from pipeline.metrics import classification_metrics, coco_map
from pipeline.models.decoder import DecoderLayer


class SequenceDecoder(nn.Module):
    """(frozen tokens (B, T, D), token ids (B, L)) -> next-token logits (B, L, vocab.out_size).

    With `geometry`, location tokens and the memory's patch tokens also carry the same fixed Fourier
    features of where they are (a location token: its bin centre on its axis; the token that predicts
    an object's class, its y1: also the box centre; a patch token: its cell centre), through one
    learned projection: the probe does not have to learn from scratch what each of the `bins`
    location tokens means, nor where each patch is. The memory is read as up to 8 prefix tokens then a
    square grid in raster order (timm ViTs on the eval job's square images); other token counts get no
    positions.
    """

    def __init__(
        self,
        token_dim: int,
        vocab: Vocab,
        max_len: int,
        width: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
        geometry: bool = False,
        bands: int = 8,
    ):
        super().__init__()
        if width % heads:
            raise ValueError(f"eval.probe.width={width} must be divisible by eval.probe.heads={heads}")
        self.vocab = vocab
        self.memory_proj = nn.Sequential(nn.LayerNorm(token_dim), nn.Linear(token_dim, width))
        self.embed = nn.Embedding(vocab.in_size, width)
        self.pos = nn.Parameter(torch.randn(1, max_len, width) * 0.02)
        self.layers = nn.ModuleList(DecoderLayer(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab.out_size)
        self.geometry = geometry
        if geometry:
            self.register_buffer("freqs", (2.0 ** torch.arange(bands)) * math.pi, persistent=False)
            self.coord_proj = nn.Linear(2 * (2 * bands + 1), width)

    def _fourier(self, x: torch.Tensor, y: torch.Tensor, has_x: torch.Tensor, has_y: torch.Tensor) -> torch.Tensor:
        """(...,) coordinates in [0, 1] and which axes they are on -> (..., width)."""

        def feats(c, on):
            angles = c[..., None] * self.freqs
            return torch.cat([angles.sin(), angles.cos(), c[..., None]], -1) * on[..., None]

        return self.coord_proj(torch.cat([feats(x, has_x), feats(y, has_y)], -1))

    def memory(self, tokens: torch.Tensor) -> torch.Tensor:
        memory = self.memory_proj(tokens)
        side = math.isqrt(tokens.shape[1])
        prefix = tokens.shape[1] - side * side
        if not self.geometry or prefix > 8:  # not a square grid of patches (plus a few prefix tokens)
            return memory
        centre = (torch.arange(side, device=tokens.device, dtype=torch.float32) + 0.5) / side
        y, x = torch.meshgrid(centre, centre, indexing="ij")
        ones = torch.ones_like(x.flatten())
        where = self._fourier(x.flatten(), y.flatten(), ones, ones)
        return torch.cat([memory[:, :prefix], memory[:, prefix:] + where], dim=1)

    def forward(self, memory: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
        """`memory` from `self.memory(tokens)`; causal self-attention over `seq`."""
        length = seq.shape[1]
        x = self.embed(seq) + self.pos[:, :length]
        if self.geometry:
            v = self.vocab
            is_loc = (seq >= v.loc0) & (seq < v.eos)
            value = ((seq - v.loc0).clamp(0, v.bins - 1).float() + 0.5) / v.bins
            # the grammar fixes each position's slot and axis: BOS, then (x0 y0 x1 y1 class)*
            slot = (torch.arange(length, device=seq.device) - 1) % TOKENS_PER_OBJECT
            on_x, on_y = (is_loc & (slot % 2 == 0)).float(), (is_loc & (slot % 2 == 1)).float()
            x = x + self._fourier(value, value, on_x, on_y) * is_loc[..., None]
            # the 4th location token of an object (y1) predicts its class: it also gets the box centre
            if length >= TOKENS_PER_OBJECT:
                v4 = value.unfold(1, 4, 1)  # (B, L - 3, 4): x0 y0 x1 y1 ending at each position >= 3
                cx, cy = (v4[..., 0] + v4[..., 2]) / 2, (v4[..., 1] + v4[..., 3]) / 2
                last = (is_loc & (slot == 3))[:, 3:].float()
                centre = self._fourier(cx, cy, last, last) * last[..., None]
                x = torch.cat([x[:, :3], x[:, 3:] + centre], dim=1)
        causal = torch.ones(length, length, dtype=torch.bool, device=seq.device).tril()
        for layer in self.layers:
            x = layer(x, memory, causal)
        return self.head(self.norm(x))


def _allowed(vocab: Vocab, device: torch.device) -> dict[str, torch.Tensor]:
    """Boolean masks over the output vocabulary, one per grammar position."""
    masks = {
        name: torch.zeros(vocab.out_size, dtype=torch.bool, device=device)
        for name in ("cls", "loc", "loc_or_eos", "eos")
    }
    masks["cls"][: vocab.num_classes] = True
    masks["loc"][vocab.loc0 : vocab.eos] = True
    masks["loc_or_eos"][vocab.loc0 : vocab.eos + 1] = True
    masks["eos"][vocab.eos] = True
    return masks


def _restrict(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return logits.masked_fill(~mask, float("-inf"))


@torch.no_grad()
def decode_detections(model: SequenceDecoder, tokens: torch.Tensor, vocab: Vocab, max_objects: int):
    """Greedy decoding of a batch: per image (boxes (K, 4) xyxy in [0, 1], labels (K,), scores (K,)).

    The score of an object is its class token's probability among the class tokens.
    """
    b, device = len(tokens), tokens.device
    memory = model.memory(tokens)
    masks = _allowed(vocab, device)
    seq = torch.full((b, 1), vocab.bos, dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    bins = torch.zeros(b, max_objects, 4, dtype=torch.long, device=device)
    labels = torch.zeros(b, max_objects, dtype=torch.long, device=device)
    scores = torch.zeros(b, max_objects, device=device)
    valid = torch.zeros(b, max_objects, dtype=torch.bool, device=device)
    for obj in range(max_objects + 1):
        for j in range(TOKENS_PER_OBJECT):
            if obj == max_objects and j > 0:
                break
            logits = model(memory, seq)[:, -1]
            if j == 0:
                mask = masks["eos"] if obj == max_objects else masks["loc_or_eos"]
            else:
                mask = masks["loc"] if j < 4 else masks["cls"]
            probs = _restrict(logits, mask).softmax(-1)
            tok = probs.argmax(-1)
            if j == 0:
                done |= tok == vocab.eos
                if obj < max_objects:
                    valid[:, obj] = ~done
            if j < 4 and obj < max_objects:
                bins[:, obj, j] = (tok - vocab.loc0).clamp(0, vocab.bins - 1)
            elif j == 4:
                labels[:, obj] = tok
                scores[:, obj] = probs.gather(1, tok[:, None])[:, 0]
            seq = torch.cat([seq, tok[:, None]], dim=1)
        if bool(done.all()):
            break
    coords = dequantize(bins.cpu().numpy(), vocab.bins)
    boxes = np.concatenate(
        [np.minimum(coords[..., :2], coords[..., 2:]), np.maximum(coords[..., :2], coords[..., 2:])], axis=-1
    )
    valid_np, labels_np, scores_np = valid.cpu().numpy(), labels.cpu().numpy(), scores.cpu().numpy()
    return [(boxes[i][valid_np[i]], labels_np[i][valid_np[i]], scores_np[i][valid_np[i]]) for i in range(b)]


@torch.no_grad()
def class_logits(
    model: SequenceDecoder,
    tokens: np.ndarray,
    image: np.ndarray,
    prompts: np.ndarray,
    vocab: Vocab,
    batch_size: int,
    device: torch.device,
) -> np.ndarray:
    """Class-token logits at the last prompt position, (R, C): classification and box classification."""
    out = []
    for s in range(0, len(prompts), batch_size):
        memory = model.memory(as_float_tensor(tokens, image[s : s + batch_size], device))
        logits = model(memory, torch.as_tensor(prompts[s : s + batch_size], device=device))[:, -1]
        out.append(logits[:, : vocab.num_classes].float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, vocab.num_classes), np.float32)


def build_decoder(token_dim: int, vocab: Vocab, kind: str, cfg: EvalConfig) -> SequenceDecoder:
    pc = cfg.probe
    max_len = 2 + TOKENS_PER_OBJECT * pc.max_objects if kind == DETECTION else TOKENS_PER_OBJECT
    torch.manual_seed(cfg.seed)
    return SequenceDecoder(
        token_dim, vocab, max_len, pc.width, pc.decoder_depth, pc.heads, pc.mlp_ratio, geometry=pc.geometry
    )


def fit_decoder(train: ProbeSplit, task: TaskInfo, cfg: EvalConfig) -> tuple[SequenceDecoder, Vocab, int, list[float]]:
    """Train one decoder probe for `task`; returns (model in eval mode, vocab, dropped objects, losses)."""
    pc, device = cfg.probe, probe_device(cfg)
    vocab = Vocab(task.num_classes, pc.coord_bins)
    rows = training_rows(train, task.kind, vocab, pc.max_objects)
    model = build_decoder(train.tokens.shape[2], vocab, task.kind, cfg).to(device)
    inputs, targets = torch.as_tensor(rows.inputs, device=device), torch.as_tensor(rows.targets, device=device)

    def loss_fn(idx: np.ndarray) -> torch.Tensor:
        length = int(rows.lengths[idx].max())
        sel = torch.as_tensor(idx, device=device)
        logits = model(model.memory(as_float_tensor(train.tokens, rows.image[idx], device)), inputs[sel, :length])
        return F.cross_entropy(
            logits.flatten(0, 1),
            targets[sel, :length].flatten(),
            ignore_index=IGNORE,
            label_smoothing=pc.label_smoothing,
        )

    losses = train_probe(model, loss_fn, len(rows.inputs), pc, cfg.seed)
    return model, vocab, rows.dropped_objects, losses


def evaluate_decoder(
    model: SequenceDecoder, vocab: Vocab, test: ProbeSplit, task: TaskInfo, cfg: EvalConfig
) -> dict[str, float]:
    """classification / box_classification: top1 (top5 above 5 classes); detection: COCO map, map50, map75."""
    pc, device = cfg.probe, probe_device(cfg)
    if task.kind == CLASSIFICATION:
        prompts = np.full((len(test), 1), vocab.bos, np.int64)
        logits = class_logits(model, test.tokens, np.arange(len(test)), prompts, vocab, pc.eval_batch_size, device)
        return classification_metrics(logits, np.asarray(test.labels), task.num_classes)
    if task.kind == BOX_CLASSIFICATION:
        image, boxes, labels = box_rows(test)
        if not len(labels):
            raise ValueError(f"probe 'decoder' on task '{task.name}': test.boxes: no boxes to classify")
        logits = class_logits(model, test.tokens, image, box_inputs(boxes, vocab), vocab, pc.eval_batch_size, device)
        return {**classification_metrics(logits, labels, task.num_classes), "n_boxes": float(len(labels))}
    preds = []
    for s in range(0, len(test), pc.eval_batch_size):
        preds += decode_detections(
            model,
            as_float_tensor(test.tokens, np.arange(s, min(s + pc.eval_batch_size, len(test))), device),
            vocab,
            pc.max_objects,
        )
    result = coco_map(
        test.boxes,
        test.box_labels,
        [p[0] for p in preds],
        [p[1] for p in preds],
        [p[2] for p in preds],
        task.num_classes,
    )
    n_gt = np.array([len(np.asarray(b).reshape(-1, 4)) for b in test.boxes])
    return {
        **result,
        "pred_per_image": float(np.mean([len(p[1]) for p in preds])),
        "gt_per_image": float(n_gt.mean()),
        "test_objects_over_max": float(np.maximum(n_gt - pc.max_objects, 0).sum()),  # unreachable by the decoder
    }


def decoder_probe(train: ProbeSplit, test: ProbeSplit, task: TaskInfo, cfg: EvalConfig) -> dict[str, float]:
    """Train on `train`, score on `test` (see evaluate_decoder), plus the final training loss."""
    model, vocab, dropped, losses = fit_decoder(train, task, cfg)
    metrics = evaluate_decoder(model, vocab, test, task, cfg)
    metrics["train_loss"] = float(np.mean(losses[-max(1, len(losses) // 10) :]))  # mean of the last 10% of steps
    if task.kind == DETECTION:
        metrics["train_objects_dropped"] = float(dropped)  # beyond eval.probe.max_objects: left out of the targets
    return metrics


DECODER = Probe("decoder", decoder_probe, kinds=(CLASSIFICATION, BOX_CLASSIFICATION, DETECTION), needs_tokens=True)
