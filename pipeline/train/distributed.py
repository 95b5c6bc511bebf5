"""Everything the loop does differently on several workers, in one place: the Ray Train session and
the cross-worker agreement on a flag.

`RaySession` implements pipeline/train/session.py's interface on a Ray Train worker: its rank, its
device, its dataset shards (`iter_torch_batches`), the checkpoint Ray Train restores after a restart
or a re-submission with the same storage path and run name, `ray.train.report` (a barrier: every
worker calls it the same number of times), DDP wrapping through `prepare_model`, and `gather` /
`barrier` (torch.distributed, for the data stream's resume state: pipeline/train/stream.py).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch

from pipeline.checkpoints import checkpoint_step
from pipeline.train.session import checkpoint_directory


def any_worker(flag: torch.Tensor) -> torch.Tensor:
    """The max of a device flag over all workers, on the device (no host sync): one skips, all skip."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return flag


class RaySession:
    """The session of a Ray Train worker (TorchTrainer's `train_loop_per_worker`)."""

    def __init__(self, resume_from: str | None = None):
        import ray.train

        self.resume_from = resume_from  # the run's newest checkpoint as the driver found it (see restored_checkpoint)

        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()

    def device(self, use_gpu: bool) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()

    def batches(self, name: str, batch_size: int, shuffle_buffer: int, device: torch.device) -> Iterator[dict]:
        import ray.train

        shard = ray.train.get_dataset_shard(name)
        return iter(
            shard.iter_torch_batches(
                batch_size=batch_size, drop_last=True, local_shuffle_buffer_size=shuffle_buffer or None, device=device
            )
        )

    @contextmanager
    def restored_checkpoint(self):
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        # Ray Train's own record of the run, unless the driver found a newer checkpoint beside it: one that the
        # driver loop (train.num_workers=0) wrote, or that a killed worker uploaded before the record named it
        if checkpoint is None or checkpoint_step(self.resume_from) > checkpoint_step(checkpoint.path):
            with checkpoint_directory(self.resume_from) as directory:
                yield directory
            return
        with checkpoint.as_directory() as directory:
            yield directory

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None, name: str) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)

    def prepare_model(self, model: torch.nn.Module, find_unused_parameters: bool) -> torch.nn.Module:
        if self.world_size == 1:
            return model
        import ray.train.torch

        kwargs = {"find_unused_parameters": find_unused_parameters}
        return ray.train.torch.prepare_model(model, move_to_device=False, parallel_strategy_kwargs=kwargs)

    def gather(self, obj: Any) -> list[Any]:
        if not _distributed():
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if _distributed():
            torch.distributed.barrier()


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()
