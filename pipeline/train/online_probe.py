"""Online probe: watch the encoder learn during pretraining, without waiting for the eval job.

Opt-in (`train.online_probe.root`). On rank 0, every `every_steps` steps and at the last step, the
student encoder's pooled features of a small labelled set (pipeline/data/labelled.py, decoded once at
the view size) are read without gradients, and two readouts are refit from scratch on them: a linear
one (ridge regression onto one-hot labels, closed form) and a cosine kNN. Their test top-1 is logged
as `online/linear_top1`, `online/knn_top1`, with the time it took (`online/probe_s`).

It cannot change pretraining: no parameter, gradient, optimiser state or batch is touched, the
encoder's train/eval mode is restored, and the random streams (CPU and the device's) are forked, so
a run with the probe trains the same weights as one without (tests/test_online_probe.py). The eval
job's probes (pipeline/eval/) stay the reference figures; these are a cheap, frequent signal.
"""

from __future__ import annotations

import time

import torch

from pipeline.config import Config
from pipeline.data.labelled import read_labelled_folder
from pipeline.metrics import knn_predict
from pipeline.models.ab_model import images_to_float
from pipeline.models.encoder import pooled_features


def ridge_top1(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, ridge: float):
    """Top-1 of a ridge-regression classifier on standardised features (float64, closed form)."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    a = torch.cat([(train_x - mean) / std, torch.ones(len(train_x), 1, dtype=train_x.dtype)], 1).double()
    b = torch.cat([(test_x - mean) / std, torch.ones(len(test_x), 1, dtype=test_x.dtype)], 1).double()
    classes = int(max(train_y.max(), test_y.max())) + 1
    targets = torch.nn.functional.one_hot(train_y, classes).double()
    gram = a.T @ a + ridge * len(a) * torch.eye(a.shape[1], dtype=torch.float64)
    weights = torch.linalg.solve(gram, a.T @ targets)
    return float(((b @ weights).argmax(1) == test_y).double().mean())


def knn_top1(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, k: int):
    """Top-1 of the eval job's weighted kNN vote (pipeline.metrics.knn_predict, T = 0.07)."""
    predicted = knn_predict(train_x.numpy(), train_y.numpy(), test_x.numpy(), k=k, temperature=0.07)[:, 0]
    return float((torch.from_numpy(predicted) == test_y).double().mean())


class OnlineProbe:
    """Rank 0's readout; `due(step)` says when, calling it with the student encoder gives the metrics."""

    def __init__(self, cfg: Config, total_steps: int, device: torch.device, batch_size: int = 256):
        op = cfg.train.online_probe
        data = read_labelled_folder(op.root, cfg.views.view_size, op.max_per_class, cfg.train.seed)
        self.every, self.total, self.k, self.ridge = max(1, op.every_steps), total_steps, op.knn_k, op.ridge
        self.device, self.batch_size = device, batch_size
        self.train_images = torch.from_numpy(data.train_images)
        self.test_images = torch.from_numpy(data.test_images)
        self.train_labels = torch.from_numpy(data.train_labels)
        self.test_labels = torch.from_numpy(data.test_labels)
        self.skipped = data.skipped

    def due(self, step: int) -> bool:
        """Whether to probe after `step` steps are done."""
        return step % self.every == 0 or step == self.total

    def _features(self, encoder: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
        parts = []
        for start in range(0, len(images), self.batch_size):
            x = images_to_float(images[start : start + self.batch_size].to(self.device))
            parts.append(pooled_features(encoder, x).float().cpu())
        return torch.cat(parts)

    def __call__(self, encoder: torch.nn.Module) -> dict[str, float]:
        started = time.perf_counter()
        devices = [self.device] if self.device.type == "cuda" else []
        was_training = encoder.training
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            encoder.eval()
            try:
                train_x = self._features(encoder, self.train_images)
                test_x = self._features(encoder, self.test_images)
            finally:
                encoder.train(was_training)
        return {
            "online/linear_top1": ridge_top1(train_x, self.train_labels, test_x, self.test_labels, self.ridge),
            "online/knn_top1": knn_top1(train_x, self.train_labels, test_x, self.test_labels, self.k),
            "online/probe_s": time.perf_counter() - started,
        }
