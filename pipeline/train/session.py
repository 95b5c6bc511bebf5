"""What the training loop needs from where it runs: a small session interface and its in-process form.

The loop (pipeline/train/loop.py) never asks Ray directly. It is handed a session that says which
worker it is, where its batches come from, which checkpoint to restore from and where to report one.
`RaySession` (pipeline/train/distributed.py) is the Ray Train worker's; `LocalSession` runs the same
loop in this process on in-memory batches, keeping checkpoints in Ray Train's run layout
(`<storage_path>/<run_name>/checkpoint_<step>`), so a second `LocalSession` on the same folder resumes
from the latest one as a restarted Ray Train worker would. Tests and debugging use it.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Protocol

import torch

from pipeline.checkpoints import latest_checkpoint_dir


class Session(Protocol):
    """The loop's view of its worker: rank, world size, device, data, checkpoints, model wrapping."""

    rank: int
    world_size: int

    def device(self, use_gpu: bool) -> torch.device: ...

    def batches(self, name: str, batch_size: int, shuffle_buffer: int, device: torch.device) -> Iterator[dict]:
        """One pass (epoch) over the named dataset shard, as dicts of tensors on `device`."""
        ...

    def restored_checkpoint(self):
        """Context manager: the local directory of the checkpoint to resume from, or None for a fresh run."""
        ...

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None, name: str) -> None:
        """Report metrics (a barrier across workers) and, from rank 0, a checkpoint directory."""
        ...

    def prepare_model(self, model: torch.nn.Module, find_unused_parameters: bool) -> torch.nn.Module:
        """The module to call each step (DDP-wrapped across several workers)."""
        ...

    def gather(self, obj: Any) -> list[Any]:
        """Every worker's `obj`, in rank order (a collective: all workers call it at the same point)."""
        ...

    def barrier(self) -> None:
        """Wait until every worker is here."""
        ...


class LocalSession:
    """One worker in this process: datasets are iterables of batch dicts (re-iterated each epoch)."""

    rank = 0
    world_size = 1

    def __init__(
        self,
        datasets: dict[str, Iterable[dict]],
        storage_path: str | os.PathLike | None = None,
        run_name: str = "local",
    ):
        self.datasets = datasets
        self.storage_path = None if storage_path is None else os.fspath(storage_path)
        self.run_name = run_name
        self.reported: list[dict[str, Any]] = []  # every report's metrics, in order

    @property
    def run_dir(self) -> str | None:
        return None if self.storage_path is None else os.path.join(self.storage_path, self.run_name)

    def device(self, use_gpu: bool) -> torch.device:
        return torch.device("cuda") if use_gpu and torch.cuda.is_available() else torch.device("cpu")

    def batches(self, name: str, batch_size: int, shuffle_buffer: int, device: torch.device) -> Iterator[dict]:
        for batch in self.datasets[name]:
            yield {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    @contextmanager
    def restored_checkpoint(self):
        yield None if self.storage_path is None else latest_checkpoint_dir(self.storage_path, self.run_name)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None, name: str) -> None:
        self.reported.append(dict(metrics))
        if checkpoint_dir is not None and self.run_dir is not None:
            target = os.path.join(self.run_dir, name)
            shutil.copytree(checkpoint_dir, target, dirs_exist_ok=True)

    def prepare_model(self, model: torch.nn.Module, find_unused_parameters: bool) -> torch.nn.Module:
        return model

    def gather(self, obj: Any) -> list[Any]:
        return [obj]

    def barrier(self) -> None:
        pass
