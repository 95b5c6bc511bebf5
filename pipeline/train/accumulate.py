"""`train.accum_steps` = K: one optimiser step over K sub-batches of the worker's batch, with the gradient of
the whole batch (docs/training.md#gradient-accumulation).

The loop hands the step the worker's `train.batch_size` rows as always; the step cuts them into K equal
sub-batches, so the optimiser, the learning rate and the view budget see the same batch as with K = 1 and
only the peak activation memory changes (about that of batch_size / K rows).

Two ways, picked by the method (`MODES`):

- `cached` (SimCLR, CLIP, AB_SimCLR, AB_CLIP: losses that couple the rows of the batch): GradCache
  (Gao et al. 2021; open_clip's `--accum-freq`). (1) Each sub-batch's student embeddings (the objective's
  `embeddings`) and teacher targets (`targets`) are computed without gradient, the random state saved
  before each. (2) The loss is computed once over the whole batch from those cached embeddings, made leaves
  that require grad (`embedding_loss`: the InfoNCE over every pair, the EMA teacher's distribution and the
  student's scores over every annotation of the batch), and backpropagated: that gives the gradient w.r.t.
  each embedding, and the full gradient of the parameters used only in the loss (CLIP's logit scale).
  (3) Each sub-batch is embedded again, with gradient, from its saved random state (dropout, drop path
  draw the same masks as in (1)), and its slice of the cached embedding gradient backpropagated
  (`emb.backward(grad)`): the encoder's gradients add up to the whole batch's. It costs one extra student
  forward pass per step.
- `mean` (MAE: a mean of per-sample terms with the same weight each, no coupling between rows): plain
  accumulation, each sub-batch's forward and backward with its loss / K; exact, no extra pass. The logged
  loss, terms and metrics are the means over the sub-batches (equal to the whole batch's for such a loss),
  diagnostics are concatenated.

DINO, SLIP and SiLC are not supported (`UNSUPPORTED`, a ConfigError at build saying why).

With several workers the sub-batches run on the objective itself, not through its DDP wrapper (whose
hooks would reduce at every sub-batch's backward, and which cannot see the gradient the cached loss gives
the logit scale); the step then averages every gradient over the workers once (`average_gradients`),
what DDP does. The cached loss still gathers every worker's embeddings with gradients, as with K = 1.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterator

from pipeline.config import Config, ConfigError

if TYPE_CHECKING:
    import torch

    from pipeline.objectives.base import Objective, Progress, StepOutput

# torch is imported by the functions that run a step, not here: the driver's `check_accumulation` (a config
# check, before the shards, storage and Ray) then costs no torch import, so a wrong path fails in a second.

CACHED, MEAN = "cached", "mean"
#: how each method accumulates (objective.name -> mode)
MODES = {"simclr": CACHED, "clip": CACHED, "ab_simclr": CACHED, "ab_clip": CACHED, "mae": MEAN}
#: the methods that cannot, and why
UNSUPPORTED = {
    "dino": (
        "DINO's centre is the running mean of the teacher's logits over the whole batch, updated once a step (and "
        "teacher_batch_entropy is a whole-batch statistic): K sub-batch passes would update it K times, and its "
        "forward is not split into embeddings + loss for the cached accumulation"
    ),
    "slip": (
        "SLIP's CLIP and SimCLR InfoNCE losses couple every row of the batch, so the mean of sub-batch gradients is "
        "not the batch's, and its forward is not split into embeddings + loss for the cached accumulation"
    ),
    "silc": (
        "SiLC's CLIP loss couples every row of the batch and its DINO branch updates the centre over the whole "
        "batch once a step; its forward is not split into embeddings + loss for the cached accumulation"
    ),
}


def check_accumulation(cfg: Config) -> str | None:
    """The accumulation mode `cfg` asks for (None: K = 1, no accumulation); ConfigError when it cannot run."""
    k, batch, name = cfg.train.accum_steps, cfg.train.batch_size, cfg.objective.name
    if k < 1:
        raise ConfigError(f"train.accum_steps must be >= 1 (1: no accumulation), got {k}")
    if k == 1:
        return None
    if batch % k:
        raise ConfigError(
            f"train.batch_size={batch} must be divisible by train.accum_steps={k}: the step cuts the worker's batch "
            "into accum_steps equal sub-batches"
        )
    if name in UNSUPPORTED:
        raise ConfigError(f"train.accum_steps={k} is not supported for objective.name={name!r}: {UNSUPPORTED[name]}")
    if name not in MODES:
        raise ConfigError(
            f"train.accum_steps={k}: objective.name={name!r} does not say how to accumulate "
            f"(pipeline/train/accumulate.py MODES: {', '.join(sorted(MODES))})"
        )
    return MODES[name]


def split_batch(batch: dict, k: int) -> tuple[list[dict], int]:
    """(K dicts of consecutive, equal row slices of every tensor of `batch`, other values shared; their rows)."""
    import torch

    rows = {v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.ndim}
    if len(rows) != 1 or next(iter(rows)) % k:
        raise ValueError(f"cannot cut a batch with row counts {sorted(rows)} into {k} equal sub-batches")
    size = next(iter(rows)) // k
    subs = [
        {key: v[i * size : (i + 1) * size] if isinstance(v, torch.Tensor) and v.ndim else v for key, v in batch.items()}
        for i in range(k)
    ]
    return subs, size


class RngState:
    """The random state a sub-batch's forward starts from (CPU generator, and the CUDA one of `device`)."""

    def __init__(self, device: torch.device):
        import torch

        self.cuda_device = device if device.type == "cuda" else None
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if self.cuda_device is not None else None

    @contextmanager
    def replay(self) -> Iterator[None]:
        """Run the block from this state; the global state afterwards is what it was before the block."""
        import torch

        devices = [self.cuda_device] if self.cuda_device is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.cuda_device)
            yield


def cached_step(
    objective: Objective,
    batch: dict,
    progress: Progress,
    k: int,
    autocast,
    backward: Callable[[torch.Tensor], None],
    device: torch.device,
) -> StepOutput:
    """GradCache: the whole batch's loss and gradients from K sub-batch passes (module docstring)."""
    import torch

    subs, n = split_batch(batch, k)
    states, parts, target_parts = [], [], []
    with torch.no_grad():
        for sub in subs:
            states.append(RngState(device))
            with autocast:
                parts.append(objective.embeddings(sub, progress))
                target_parts.append(objective.targets(sub, progress))
    for part in parts + target_parts:
        wrong = {key: tuple(v.shape) for key, v in part.items() if v.ndim == 0 or v.shape[0] != n}
        if wrong:
            raise ValueError(f"{type(objective).__name__}: embeddings and targets must be per row ({n}), got {wrong}")
    cache = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    cache = {key: v.requires_grad_() if v.is_floating_point() else v for key, v in cache.items()}
    targets = {key: torch.cat([t[key] for t in target_parts]) for key in target_parts[0]}
    del parts, target_parts
    with autocast:
        out = objective.embedding_loss(batch, cache, targets, progress)
    backward(out.loss)  # gradients w.r.t. the cached embeddings, and of the parameters used in the loss only
    grads = {key: v.grad for key, v in cache.items() if v.grad is not None}
    del cache
    for i, (sub, state) in enumerate(zip(subs, states)):
        with replay_rng(state), autocast:
            embedded = objective.embeddings(sub, progress)
        pairs = [(embedded[key], g[i * n : (i + 1) * n]) for key, g in grads.items() if embedded[key].requires_grad]
        if pairs:
            torch.autograd.backward([e for e, _ in pairs], [g for _, g in pairs])
        del embedded, pairs
    return out


def replay_rng(state: RngState):
    """The context a sub-batch is re-embedded in: its saved random state (a seam the tests replace)."""
    return state.replay()


def mean_step(
    objective: Objective,
    batch: dict,
    progress: Progress,
    k: int,
    autocast,
    backward: Callable[[torch.Tensor], None],
) -> StepOutput:
    """Plain accumulation of a loss that is a mean of per-sample terms: sum of (sub-batch loss / K) gradients."""
    import torch

    from pipeline.objectives.base import StepOutput

    outs = []
    for sub in split_batch(batch, k)[0]:
        with autocast:
            out = objective(sub, progress)
        backward(out.loss / k)
        outs.append(out)

    def mean(values: list) -> torch.Tensor:
        return torch.stack([torch.as_tensor(v).detach().float() for v in values]).mean()

    first = outs[0]
    return StepOutput(
        mean([o.loss for o in outs]),
        {key: mean([o.terms[key] for o in outs]) for key in first.terms},
        {key: mean([o.metrics[key] for o in outs]) for key in first.metrics},
        {key: torch.cat([o.diagnostics[key] for o in outs]) for key in first.diagnostics},
    )


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Average every gradient over the workers (what DDP's reducer does), one all-reduce per dtype."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    world = dist.get_world_size()
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat.div_(world)
        for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(reduced)
