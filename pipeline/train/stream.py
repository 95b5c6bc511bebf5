"""The loop's data: batches pass after pass, what each stream has trained on, and resuming mid-pass.

Each stream ("train" and, decoupled, "annotations") keeps a `StreamLedger` (pipeline/data/passes.py)
of the (pass, row) pairs its batches carried. A checkpoint stores the union over workers with every
worker's torch RNG state (`resume_state`); a restored loop puts that union where the stream's read
tasks look (`publish`: the run's ResumePoint actor) before any worker asks for a batch, so the rest
of an interrupted pass is read without the rows trained on, and drops any that still arrive
(`fresh_batches`, which then re-cuts full batches). With `data.deterministic` (Ray Data's
preserve_order, no local shuffle) the resumed stream is the uninterrupted one's, batch for batch.
"""

from __future__ import annotations

import json
import os
from typing import Iterator

import numpy as np
import torch

from pipeline.config import Config
from pipeline.data.passes import StreamLedger
from pipeline.train.session import Session

# Columns a decoupled annotation stream contributes to each batch (the rest come from the crop stream).
ANNOTATION_COLUMNS = ("ann_views", "tokens")
# Bookkeeping columns: where a row is in its stream (passes.py); taken off before the model sees a batch.
PLACE_COLUMNS = ("pass", "row", "ann_pass", "ann_row")


def streams(cfg: Config) -> list[str]:
    return ["train", "annotations"] if cfg.data.decoupled else ["train"]


def batches(session: Session, cfg: Config, device: torch.device, ledgers: dict[str, StreamLedger]) -> Iterator[dict]:
    """Batches for ever, pass after pass; with a decoupled annotation stream, its columns merged in
    (its place as `ann_pass` / `ann_row`). A stream yielding no full batch in a whole run through its
    passes is an error, not a hang."""
    annotations = _endless(session, "annotations", cfg, device, ledgers["annotations"]) if cfg.data.decoupled else None
    for batch in _endless(session, "train", cfg, device, ledgers["train"]):
        if annotations is not None:  # AB_{I1K+D}: annotation views from their own stream
            other = next(annotations)
            batch = {**batch, **{k: v for k, v in other.items() if k in ANNOTATION_COLUMNS}}
            batch.update({f"ann_{k}": other[k] for k in ("pass", "row") if k in other})
        yield batch


def _endless(session: Session, name: str, cfg: Config, device: torch.device, ledger: StreamLedger) -> Iterator[dict]:
    shuffle = 0 if cfg.data.deterministic else cfg.data.shuffle_buffer
    size = cfg.train.batch_size
    while True:
        empty = True
        for batch in fresh_batches(session.batches(name, size, shuffle, device), ledger, size):
            empty = False
            if "pass" in batch:
                ledger.record(batch["pass"].cpu().numpy(), batch["row"].cpu().numpy())
            yield batch
        if empty:
            what = "training dataset" if name == "train" else "annotation stream"
            raise RuntimeError(
                f"the {what} yielded no full batch: check data.shards / data.annotation_shards (is it empty, or "
                f"every image skipped?) and that train.batch_size={size} is not larger than the per-worker data"
            )
        # The stream ran dry before the budget (skipped images ate the spare pass): read its passes again,
        # as a new generation, with nothing skipped by the read tasks.
        ledger.new_generation()
        if session.rank == 0:
            publish(cfg, {name: ledger.state()})
        session.barrier()


def fresh_batches(stream: Iterator[dict], ledger: StreamLedger, batch_size: int) -> Iterator[dict]:
    """The stream's batches without rows the ledger holds, re-cut into full batches where rows were
    dropped (normally none: the read tasks skip them first; counted in `ledger.dropped`)."""
    held: list[dict] = []
    count = 0
    for batch in stream:
        if "pass" not in batch:
            yield batch
            continue
        keep = ledger.fresh(batch["pass"].cpu().numpy(), batch["row"].cpu().numpy())
        if keep.all() and not held:
            yield batch
            continue
        ledger.dropped += int((~keep).sum())
        index = torch.from_numpy(np.flatnonzero(keep)).to(batch["pass"].device)
        held.append({k: v.index_select(0, index) for k, v in batch.items()})
        count += int(index.numel())
        while count >= batch_size:
            joined = {k: torch.cat([h[k] for h in held]) for k in held[0]}
            yield {k: v[:batch_size] for k, v in joined.items()}
            rest = {k: v[batch_size:] for k, v in joined.items()}
            count -= batch_size
            held = [rest] if count else []


def take_place(batch: dict) -> dict:
    """Remove and return the bookkeeping columns (as CPU numpy arrays)."""
    return {k: batch.pop(k).cpu().numpy() for k in PLACE_COLUMNS if k in batch}


def resume_state(session: Session, ledgers: dict[str, StreamLedger]) -> dict:
    """What a checkpoint needs to resume the stream exactly (all workers call this at the same steps):
    {"streams": {name: union of the workers' ledgers}, "rng": [each rank's torch RNG state]}."""
    gathered = session.gather(
        {"streams": {name: ledger.state() for name, ledger in ledgers.items()}, "rng": torch.get_rng_state()}
    )
    return {
        "streams": {n: StreamLedger.merge([g["streams"][n] for g in gathered]) for n in ledgers},
        "rng": [g["rng"] for g in gathered],
    }


def restore_stream(cfg: Config, session: Session, saved: dict | None) -> dict[str, StreamLedger]:
    """Each stream's ledger from a checkpoint's resume state (empty for a fresh run or an old checkpoint);
    rank 0 publishes them to the read tasks, then every worker waits, so no read task starts before."""
    saved = saved or {}
    ledgers = {name: StreamLedger(saved.get("streams", {}).get(name)) for name in streams(cfg)}
    rngs = saved.get("rng") or []
    if len(rngs) == session.world_size:  # the same workers as before: each continues its own random stream
        torch.set_rng_state(rngs[session.rank])
    if session.rank == 0:
        publish(cfg, {name: ledger.state() for name, ledger in ledgers.items()})
    session.barrier()
    return ledgers


def publish(cfg: Config, states: dict[str, dict]) -> None:
    """Tell the run's read tasks which rows to skip (the ResumePoint actor the driver created, if any)."""
    from pipeline.data.passes import RESUME_NAMESPACE

    name = resume_point_name(cfg)
    try:
        import ray

        if not ray.is_initialized():
            return
        actor = ray.get_actor(name, namespace=RESUME_NAMESPACE)
    except (ImportError, ValueError):
        return
    ray.get([actor.set.remote(stream, state) for stream, state in states.items()])


def resume_point_name(cfg: Config) -> str:
    return f"resume-{cfg.train.run_name}"


class KeyLog:
    """`train.key_log`: one JSON line per step and worker with the (pass, row) of every row it trained
    on, for auditing a run's passes (tests/test_resume.py). Off by default."""

    def __init__(self, directory: str, rank: int):
        self.path = os.path.join(directory, f"rank{rank}.jsonl") if directory else None
        if self.path:
            os.makedirs(directory, exist_ok=True)

    def write(self, step: int, place: dict, ledgers: dict[str, StreamLedger]) -> None:
        if not self.path or not place:
            return
        line = {"step": step, "generation": ledgers["train"].generation}
        line.update({k: v.tolist() for k, v in place.items()})
        with open(self.path, "a") as fh:
            fh.write(json.dumps(line) + "\n")
