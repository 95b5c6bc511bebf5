"""What the training loop needs from where it runs: a small session interface and its in-process form.

The loop (pipeline/train/loop.py) never asks Ray directly. It is handed a session that says which
worker it is, where its batches come from, which checkpoint to restore from and where to report one.
`RaySession` (pipeline/train/distributed.py) is the Ray Train worker's; `LocalSession` runs the same
loop in this process on in-memory batches, keeping checkpoints in Ray Train's run layout
(`<storage_path>/<run_name>/checkpoint_<step>`), so a second `LocalSession` on the same folder resumes
from the latest one as a restarted Ray Train worker would. Tests and debugging use it.
`DriverSession` is `train.num_workers=0`: the same loop in the driver process on the run's Ray Data
streams, with no Ray Train controller or workers, checkpoints on any storage in that same layout.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import tempfile
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Protocol

import torch

from pipeline.checkpoints import META_FILE, latest_checkpoint_dir, list_checkpoints


@contextmanager
def checkpoint_directory(path: str | None) -> Iterator[str | None]:
    """A checkpoint (local path or URI) as a local folder for the span of the block; None stays None."""
    from pipeline.storage import copy_to_local, is_local

    if path is None or is_local(path):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="abpipe-restore-") as tmp:
        yield copy_to_local(path, tmp)


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
        newest = None if self.storage_path is None else latest_checkpoint_dir(self.storage_path, self.run_name)
        with checkpoint_directory(newest) as directory:  # a URI's checkpoint is copied for the block's span
            yield directory

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


class DriverSession(LocalSession):
    """The loop in the driver process (`train.num_workers=0`): batches from Ray Data datasets iterated here,
    checkpoints written to `<storage_path>/<run_name>/<name>` (local or a URI) as Ray Train lays them out,
    the newest `keep` of them kept. What it saves is Ray Train's start-up: no controller, no worker group,
    no dataset split coordinator, no second torch import. A run resumes across the two modes: this session
    restores the newest checkpoint whoever wrote it, and Ray Train's workers are handed the driver's find
    when it is newer than Ray Train's own record (distributed.RaySession)."""

    def __init__(self, datasets: dict, storage_path: str, run_name: str, keep: int = 0):
        super().__init__(datasets, storage_path, run_name)
        self.keep = keep  # 0 or less: keep every checkpoint
        # the run's checkpoint folders by step, earlier submissions' included (the newest `keep` stay)
        self.saved: list[str] = list_checkpoints(storage_path, run_name)

    def device(self, use_gpu: bool) -> torch.device:
        if use_gpu and not torch.cuda.is_available():
            raise RuntimeError("train.use_gpu=true but the driver sees no CUDA device (train.num_workers=0)")
        return torch.device("cuda") if use_gpu else torch.device("cpu")

    def batches(self, name: str, batch_size: int, shuffle_buffer: int, device: torch.device) -> Iterator[dict]:
        return iter(
            self.datasets[name].iter_torch_batches(
                batch_size=batch_size, drop_last=True, local_shuffle_buffer_size=shuffle_buffer or None, device=device
            )
        )

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None, name: str) -> None:
        import pyarrow.fs as pafs

        from pipeline.storage import filesystem, join

        self.reported.append(dict(metrics))
        if checkpoint_dir is None:
            return
        fs, run_dir = filesystem(join(self.storage_path, self.run_name))
        target = f"{run_dir}/{name}"
        if fs.get_file_info(target).type != pafs.FileType.NotFound:
            fs.delete_dir(target)
        files = sorted(
            os.path.relpath(os.path.join(folder, f), checkpoint_dir)
            for folder, _, names in os.walk(checkpoint_dir)
            for f in names
        )
        # meta.json last, on any storage: a folder without it was cut short and latest_checkpoint skips it
        for rel in sorted(files, key=lambda f: f == META_FILE):
            fs.create_dir(posixpath.dirname(f"{target}/{rel}"), recursive=True)
            with open(os.path.join(checkpoint_dir, rel), "rb") as src, fs.open_output_stream(f"{target}/{rel}") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        self.saved = sorted({*self.saved, name})  # by step (the names' zero-padded steps), as Ray Train's record
        while 0 < self.keep < len(self.saved):
            fs.delete_dir(f"{run_dir}/{self.saved.pop(0)}")

    @property
    def last_checkpoint(self) -> str | None:
        from pipeline.storage import join

        return join(self.storage_path, self.run_name, self.saved[-1]) if self.saved else None  # the newest
