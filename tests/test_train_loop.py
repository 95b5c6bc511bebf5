"""The training loop's parts, in this process (LocalSession): no host sync on non-logging steps, a
non-finite step skipped on the device, resuming from the latest checkpoint, the run's record."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.checkpoints import CheckpointError, latest_checkpoint_dir, read_meta, read_run_record, write_run_record
from pipeline.objectives.registry import build_objective
from pipeline.train.loop import train
from pipeline.train.session import LocalSession
from pipeline.train.step import Budget, TrainStep, make_optimizer, param_groups, peak_lr
from tests.test_train import BATCH, M, _batch, micro_config

GOOD_BOXES = (
    torch.tensor([[0.0, 0.0, 0.6, 0.6], [0.2, 0.3, 1.0, 0.9], [0.1, 0.1, 0.7, 1.0]]).expand(BATCH, M, 4).clone()
)
BAD_BOXES = torch.zeros(BATCH, M, 4)  # zero-width boxes: NaN actions, a non-finite loss


class HostSyncs(TorchDispatchMode):
    """Counts what would make the host wait for a GPU, as it happens on the CPU.

    On CUDA these block the host until the device has caught up: reading a value (`item`, `bool`,
    `float`, `int`: aten._local_scalar_dense), ops whose output size depends on the data (nonzero,
    masked_select, unique, boolean-mask indexing), whole-tensor reads (`tolist`, `numpy`, `cpu`) and
    uploads from Python data (`torch.tensor(..., device=...)`, a blocking copy). The dispatch mode
    sees every aten op, including those inside torch (e.g. a `_foreach_lerp_` with a tensor weight
    reads it as a scalar); the rest are patched where Python calls them.
    """

    DATA_DEPENDENT = {"nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_consecutive", "unique_dim"}

    def __init__(self):
        super().__init__()
        self.count = 0
        self.seen: list[str] = []
        self._patched = []

    def _hit(self, what: str) -> None:
        self.count += 1
        self.seen.append(what)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name == "_local_scalar_dense" or name in self.DATA_DEPENDENT:
            self._hit(name)
        elif name == "index" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else [])
        ):
            self._hit("index[bool]")
        return func(*args, **(kwargs or {}))

    def _patch(self, owner, attr, counted):
        original = getattr(owner, attr)

        def wrapper(*args, **kwargs):
            if counted(*args, **kwargs):
                self._hit(attr)
            return original(*args, **kwargs)

        setattr(owner, attr, wrapper)
        self._patched.append((owner, attr, original))

    def __enter__(self):
        for attr in ("tolist", "numpy", "cpu"):
            self._patch(torch.Tensor, attr, lambda *a, **k: True)
        self._patch(torch, "tensor", lambda *a, **k: k.get("device") is not None)
        return super().__enter__()

    def __exit__(self, *exc):
        for owner, attr, original in reversed(self._patched):
            setattr(owner, attr, original)
        self._patched.clear()
        return super().__exit__(*exc)


class CountedBatches:
    """A dataset whose iteration records the sync count each time the loop asks for the next batch."""

    def __init__(self, batches: list[dict], syncs: HostSyncs):
        self.batches, self.syncs, self.marks = batches, syncs, []

    def __iter__(self):
        for batch in self.batches:
            self.marks.append(self.syncs.count)
            yield batch


def test_non_logging_steps_do_not_sync_with_the_host(tmp_path):
    steps, log_every = 7, 3
    cfg = micro_config(tmp_path, tmp_path, steps=steps, log_every_steps=log_every, checkpoint_every_steps=1000)
    syncs = HostSyncs()
    data = CountedBatches([_batch(GOOD_BOXES)] * steps, syncs)
    with syncs:
        train(cfg, LocalSession({"train": data}))
    # marks[i]: the count when step i's batch was taken, so step i's own syncs are seen[marks[i]:marks[i + 1]]
    per_step = [syncs.seen[a:b] for a, b in zip(data.marks, data.marks[1:])]
    logging = [(i + 1) % log_every == 0 for i in range(len(per_step))]
    assert logging == [False, False, True, False, False, True]
    # The first step uploads the image normalisation constants, once per device and process (models.ab_model):
    # none when an earlier test in this process already did.
    assert per_step[0] in (["tensor", "tensor"], []), per_step
    assert [len(seen) for seen, is_logged in zip(per_step[1:], logging[1:]) if not is_logged] == [0, 0, 0], per_step
    assert all(seen for seen, is_logged in zip(per_step, logging) if is_logged), (
        "the counter must see the logging steps' reads"
    )


def test_the_sync_counter_sees_what_blocks_a_gpu():
    x = torch.ones(3)
    with HostSyncs() as syncs:
        float(x.sum()), bool(x[0] > 0), x.tolist(), x[x > 0], torch.tensor([1.0], device="cpu")
        torch._foreach_lerp_([torch.ones(2)], [torch.zeros(2)], torch.tensor(0.5))  # reads the weight on the host
        quiet = syncs.count
        torch._foreach_mul_([torch.ones(2)], torch.tensor(0.5))
        x.add_(1), torch.isfinite(x).all(), torch.zeros((), device="cpu")
    assert quiet == 6 and syncs.count == 6, syncs.seen


def _step(tmp_path, steps: int = 10):
    cfg = micro_config(tmp_path, tmp_path, steps=steps)
    torch.manual_seed(0)
    objective = build_objective(cfg)
    optimizer = make_optimizer(objective, peak_lr(cfg, 1), cfg.train.weight_decay)
    return (
        objective,
        optimizer,
        TrainStep(cfg, objective, objective, optimizer, Budget.from_config(cfg, 1), torch.device("cpu")),
    )


def _snapshot(objective, optimizer):
    return [t.clone() for t in objective.state_dict().values()], [
        t.clone() for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)
    ]


def _same(a, b) -> bool:
    return all(len(x) == len(y) and all(torch.equal(p, q) for p, q in zip(x, y)) for x, y in zip(a, b))


def test_a_non_finite_step_is_skipped_on_the_device(tmp_path):
    """Student, teacher and AdamW state (moments and step counts) are exactly unchanged by a bad step."""
    objective, optimizer, step = _step(tmp_path)
    first = step(_batch(GOOD_BOXES), 0, logging=False, diagnose=False)
    assert first.found_inf.item() == 0
    before = _snapshot(objective, optimizer)
    bad = step(_batch(BAD_BOXES), 1, logging=False, diagnose=False)
    assert bad.found_inf.item() == 1 and not torch.isfinite(bad.out.loss)
    assert _same(_snapshot(objective, optimizer), before), "a skipped step must change nothing"
    good = step(_batch(GOOD_BOXES), 2, logging=False, diagnose=False)
    assert good.found_inf.item() == 0 and not _same(_snapshot(objective, optimizer), before)
    assert objective.teacher is not None and all(torch.isfinite(p).all() for p in objective.parameters())


def test_a_foreach_optimiser_checkpoint_resumes_into_the_fused_skip(tmp_path):
    """Checkpoints written before the fused AdamW (foreach state, `fused` None) still resume and skip."""
    from pipeline.checkpoints import save_checkpoint
    from pipeline.train.checkpointing import restore

    objective, optimizer, step = _step(tmp_path)
    step(_batch(GOOD_BOXES), 0, logging=False, diagnose=False)
    foreach = torch.optim.AdamW(param_groups(objective, 0.05), lr=1e-3)  # what the loop used before
    for p in objective.parameters():
        p.grad = torch.zeros_like(p)
    foreach.step()
    save_checkpoint(
        tmp_path / "old",
        {"objective": objective.state_dict(), "optimizer": foreach.state_dict()},
        {"step": 1, "views_seen": 0},
    )
    objective2, optimizer2, step2 = _step(tmp_path)
    restore(str(tmp_path / "old"), objective2, optimizer2, torch.device("cpu"))
    before = _snapshot(objective2, optimizer2)
    assert step2(_batch(BAD_BOXES), 1, logging=False, diagnose=False).found_inf.item() == 1
    assert _same(_snapshot(objective2, optimizer2), before)


def test_skipped_steps_are_counted_and_the_run_goes_on(tmp_path, capsys):
    """Two isolated bad batches among good ones (max_bad_steps 3): counted, reported at the next logging
    step, and the run finishes its budget with finite weights."""
    cfg = micro_config(tmp_path, tmp_path, steps=8, log_every_steps=4, checkpoint_every_steps=1000, max_bad_steps=3)
    boxes = [GOOD_BOXES, BAD_BOXES, GOOD_BOXES, GOOD_BOXES, GOOD_BOXES, BAD_BOXES, GOOD_BOXES, GOOD_BOXES]
    session = LocalSession({"train": [_batch(b) for b in boxes]}, tmp_path / "ck")
    train(cfg, session)
    meta = read_meta(latest_checkpoint_dir(str(tmp_path / "ck"), "local"))
    assert meta["step"] == 8 and meta["bad_steps"] == 2
    out = capsys.readouterr().out
    assert "step 4: 1 non-finite step(s) skipped (0 in a row, 1 in all)" in out
    assert "step 8: 1 non-finite step(s) skipped (0 in a row, 2 in all)" in out
    assert all(r["loss"] == r["loss"] for r in session.reported)  # the logged losses are of good steps


def test_a_local_session_resumes_from_its_latest_checkpoint(tmp_path, capsys):
    cfg = micro_config(tmp_path, tmp_path, steps=4, checkpoint_every_steps=2)
    batches = [_batch(GOOD_BOXES)] * 4
    train(cfg, LocalSession({"train": batches}, tmp_path / "ck"))
    longer = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, total_views=cfg.train.total_views * 3 // 2))
    train(longer, LocalSession({"train": batches}, tmp_path / "ck"))
    assert "resumed from step 4" in capsys.readouterr().out
    meta = read_meta(latest_checkpoint_dir(str(tmp_path / "ck"), "local"))
    assert meta["step"] == 6 and meta["views_seen"] == 6 * Budget.from_config(cfg, 1).views_per_step


def test_a_resumed_run_keeps_its_cost_figures(tmp_path):
    """FLOPs per step (counted on the run's first step) and the loop's seconds carry across a resume, so a
    study row of a run that was interrupted, or resumed after it had finished, reports the whole run's cost."""
    cfg = micro_config(tmp_path, tmp_path, steps=4, checkpoint_every_steps=2)
    batches = [_batch(GOOD_BOXES)] * 4
    first = LocalSession({"train": batches}, tmp_path / "ck")
    train(cfg, first)
    flops, train_s = first.reported[-1]["flops_per_step"], first.reported[-1]["train_s"]
    assert flops > 0 and train_s > 0
    again = LocalSession({"train": batches}, tmp_path / "ck")  # the run had finished: no step runs
    train(cfg, again)
    assert again.reported[-1]["flops_per_step"] == flops and again.reported[-1]["train_s"] == pytest.approx(
        train_s, abs=1e-2
    )
    longer = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, total_views=cfg.train.total_views * 3 // 2))
    more = LocalSession({"train": batches}, tmp_path / "ck")
    train(longer, more)
    assert more.reported[-1]["flops_per_step"] == flops and more.reported[-1]["train_s"] > train_s
    meta = read_meta(latest_checkpoint_dir(str(tmp_path / "ck"), "local"))
    assert meta["flops_per_step"] == flops and meta["train_s"] == pytest.approx(more.reported[-1]["train_s"], abs=1e-2)


def test_the_run_record_is_written_once(tmp_path):
    assert read_run_record(str(tmp_path), "run") is None
    write_run_record(str(tmp_path), "run", {"mlflow_run_id": "a" * 32})
    assert read_run_record(str(tmp_path), "run") == {"mlflow_run_id": "a" * 32}
    with pytest.raises(CheckpointError, match="written once"):
        write_run_record(str(tmp_path), "run", {"mlflow_run_id": "b" * 32})
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "abpipe_run.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt run record"):
        read_run_record(str(tmp_path), "other")


@pytest.mark.parametrize("where", ["local", "memory"])
def test_the_driver_session_restores_the_newest_writes_meta_last_and_keeps_the_newest(tmp_path, where):
    """`train.num_workers=0`'s checkpoints: Ray Train's layout on any storage. It restores the newest complete
    checkpoint (an earlier submission's, a cut-short folder skipped), writes a folder whose meta.json marks it
    complete, replaces a cut-short one of the same step, and keeps the newest `keep` by step."""
    import uuid

    from pipeline.checkpoints import list_checkpoints, save_checkpoint
    from pipeline.storage import copy_to_local, exists, filesystem, join
    from pipeline.train.session import DriverSession

    storage = str(tmp_path / "ck") if where == "local" else f"memory://abpipe-{uuid.uuid4().hex}"
    fs, run_dir = filesystem(join(storage, "run"))

    def write(step: int, complete: bool = True) -> None:  # a folder as an earlier submission left it
        folder = save_checkpoint(tmp_path / "src" / f"{step}", {"w": torch.full((2,), float(step))}, {"step": step})
        files = ["state.pt", "meta.json"] if complete else ["state.pt"]
        fs.create_dir(f"{run_dir}/checkpoint_{step:08d}", recursive=True)
        for name in files:
            with fs.open_output_stream(f"{run_dir}/checkpoint_{step:08d}/{name}") as out:
                out.write((folder / name).read_bytes())

    write(2), write(4), write(6, complete=False)
    session = DriverSession({}, storage, "run", keep=2)
    with session.restored_checkpoint() as directory:
        assert read_meta(directory)["step"] == 4  # checkpoint_00000006 has no meta.json: cut short
        assert torch.load(f"{directory}/state.pt")["w"].tolist() == [4.0, 4.0]
    session.report({"loss": 1.0}, None, "unused")  # metrics only: no folder
    for step in (6, 8):
        folder = save_checkpoint(tmp_path / "new" / f"{step}", {"w": torch.full((2,), -float(step))}, {"step": step})
        session.report({"loss": 1.0 / step, "step": step}, str(folder), f"checkpoint_{step:08d}")
    assert list_checkpoints(storage, "run") == ["checkpoint_00000006", "checkpoint_00000008"]
    assert not exists(join(storage, "run", "unused"))
    assert session.last_checkpoint == join(storage, "run", "checkpoint_00000008")
    assert [r["loss"] for r in session.reported] == [1.0, 1 / 6, 1 / 8]
    six = copy_to_local(join(storage, "run", "checkpoint_00000006"), str(tmp_path / "six"))
    assert read_meta(six)["step"] == 6 and torch.load(f"{six}/state.pt")["w"].tolist() == [-6.0, -6.0]
    again = DriverSession({}, storage, "run", keep=2)  # the next submission sees both, restores the newest
    with again.restored_checkpoint() as directory:
        assert read_meta(directory)["step"] == 8
    # a write cut short (a file that cannot be read, as a lost local disk would be) leaves no meta.json behind
    broken = save_checkpoint(tmp_path / "new" / "10", {"w": torch.zeros(2)}, {"step": 10})
    (broken / "state.pt").unlink()
    (broken / "state.pt").symlink_to(tmp_path / "gone")
    with pytest.raises(FileNotFoundError):
        again.report({"step": 10}, str(broken), "checkpoint_00000010")
    assert not exists(join(storage, "run", "checkpoint_00000010", "meta.json"))
    with DriverSession({}, storage, "run").restored_checkpoint() as directory:
        assert read_meta(directory)["step"] == 8
