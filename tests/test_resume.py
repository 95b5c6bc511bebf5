"""Exact mid-pass resume (issue 18 §2): every row knows its pass and identity, a checkpoint keeps what
each pass has trained on, and a run killed mid-pass trains on each pass's rows exactly once, with the
crops of an uninterrupted run; in deterministic mode it ends on the uninterrupted run's weights.

The interval and ledger arithmetic is checked against plain Python sets; the Ray tests kill a real
Ray Train worker (SIGKILL) on the local cluster and read the per-step key log (`train.key_log`).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import tarfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data.passes import (
    StreamLedger,
    contains,
    covers,
    intervals,
    pass_items,
    read_items,
    row_base,
    row_copy,
    union,
)
from pipeline.train.stream import fresh_batches

# ---------------------------------------------------------------- interval sets vs Python sets


def _ids(pairs) -> set[int]:
    return {i for s, e in np.asarray(pairs).reshape(-1, 2) for i in range(int(s), int(e))}


def test_interval_sets_agree_with_python_sets():
    rng = np.random.default_rng(0)
    for _ in range(200):
        a = rng.choice(300, size=rng.integers(0, 120), replace=False)
        b = rng.choice(300, size=rng.integers(0, 120), replace=False)
        ia, ib = intervals(a), intervals(b)
        assert _ids(ia) == set(a.tolist()) and _ids(ib) == set(b.tolist())
        assert np.all(ia[1:, 0] > ia[:-1, 1]) if len(ia) > 1 else True  # sorted, merged (no touching)
        both = union(ia, ib)
        assert _ids(both) == set(a.tolist()) | set(b.tolist())
        assert len(both) == len(intervals(np.r_[a, b]))  # merged as tightly as from the ids
        probe = np.arange(-5, 310)
        assert contains(both, probe).tolist() == [int(i) in (set(a.tolist()) | set(b.tolist())) for i in probe]
    assert covers(np.array([[10, 20]]), 10, 20) and covers(np.array([[0, 50]]), 10, 20)
    assert not covers(np.array([[10, 15], [16, 20]]), 10, 20) and not covers(np.zeros((0, 2)), 0, 1)


def test_row_ids_are_unique_per_pass_and_carry_the_copy():
    ids = {row_base(s, c, f) + o for s in range(3) for c in range(3) for f in range(4) for o in (0, 1, 999)}
    assert len(ids) == 3 * 3 * 4 * 3 and all(0 <= i < 2**63 for i in ids)
    assert row_copy(np.array([row_base(2, 5, 7) + 3, row_base(0, 0, 0)])).tolist() == [5, 0]
    with pytest.raises(ValueError, match="out of range"):
        row_base(0, 256, 0)


def test_ledger_merges_workers_and_drops_what_was_trained_on():
    a, b = StreamLedger(), StreamLedger()
    a.record(np.array([0, 0, 1]), np.array([5, 6, 5]))
    b.record(np.array([0, 1, 1]), np.array([7, 6, 9]))
    merged = StreamLedger.merge([a.state(), b.state()])
    assert merged == {"generation": 0, "passes": {0: [[5, 8]], 1: [[5, 7], [9, 10]]}}
    restored = StreamLedger(json.loads(json.dumps(merged)))  # survives JSON (string pass keys)
    keep = restored.fresh(np.array([0, 0, 1, 1, 2]), np.array([5, 8, 6, 8, 5]))
    assert keep.tolist() == [False, True, False, True, True]
    assert restored.trained() == 6
    restored.new_generation()
    assert restored.fresh(np.array([0]), np.array([5])).tolist() == [True] and restored.generation == 1


def test_fresh_batches_drop_trained_rows_and_recut_full_batches():
    ledger = StreamLedger({"passes": {0: [[2, 5]]}})  # rows 2, 3, 4 of pass 0 were trained on

    def batch(rows):
        rows = torch.tensor(rows)
        return {"pass": torch.zeros_like(rows), "row": rows, "views": rows.float()[:, None] * 10}

    out = list(fresh_batches(iter([batch([0, 1, 2, 3]), batch([4, 5, 6, 7]), batch([8, 9, 10, 11])]), ledger, 4))
    assert [b["row"].tolist() for b in out] == [[0, 1, 5, 6], [7, 8, 9, 10]]  # the last partial one is dropped
    assert all(torch.equal(b["views"][:, 0], b["row"].float() * 10) for b in out)  # columns stay aligned
    assert ledger.dropped == 3
    untouched = [batch([5, 6, 7, 8])]
    assert next(fresh_batches(iter(untouched), ledger, 4)) is untouched[0]  # nothing dropped: the same batch


# ---------------------------------------------------------------- the pass reader on real tar shards


def _write_shards(root: Path, files: int, per_file: int, tag: str) -> Path:
    """A shard set as the ingest writes it (tars of key.jpg/key.json, _stats.json, manifest.parquet),
    with stand-in bytes: the reader never decodes."""
    import pandas as pd

    root.mkdir(parents=True)
    names, rows = [], []
    for f in range(files):
        name = f"shard-{f:06d}.tar"
        names.append(name)
        with tarfile.open(root / name, "w") as tar:
            for o in range(per_file):
                key = f"{tag}{f:02d}{o:03d}"
                for ext, data in (("jpg", key.encode()), ("json", json.dumps({"labels": [tag]}).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                rows.append({"key": key, "shard": name, "status": "ok"})
    stats = {"source": "test", "total": files * per_file, "counts": {"ok": files * per_file}, "shards": names}
    (root / "_stats.json").write_text(json.dumps(stats))
    pd.DataFrame(rows).to_parquet(root / "manifest.parquet")
    return root


def _read(items: list[dict]) -> dict:
    batches = [read_items({k: np.array([v]) for k, v in item.items()}) for item in items]
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def test_passes_list_every_file_once_per_pass_in_a_seeded_order(tmp_path):
    shards = _write_shards(tmp_path / "a", files=4, per_file=5, tag="a")
    items = pass_items(str(shards), passes=3, seed=0)
    by_pass = [[i["name"] for i in items if i["pass"] == p] for p in range(3)]
    assert all(sorted(p) == sorted(set(p)) and len(p) == 4 for p in by_pass)
    assert len({tuple(p) for p in by_pass}) > 1  # passes are not all in one order
    assert pass_items(str(shards), 3, seed=0) == items and pass_items(str(shards), 3, seed=1) != items
    rows = _read(items)
    for p in range(3):
        mine = rows["row"][rows["pass"] == p]
        assert len(mine) == 20 and len(set(mine.tolist())) == 20  # every row once per pass
    assert sorted(set(rows["__key__"].tolist())) == sorted(f"a{f:02d}{o:03d}" for f in range(4) for o in range(5))
    assert all(k.encode() == j for k, j in zip(rows["__key__"], rows["jpg"]))  # members grouped by key


def test_a_mixture_pass_repeats_the_small_source_with_distinct_rows_and_a_seeded_sample(tmp_path):
    big = _write_shards(tmp_path / "big", files=4, per_file=25, tag="b")  # 100 rows
    small = _write_shards(tmp_path / "small", files=1, per_file=20, tag="s")  # 20 rows
    mixture = {str(big): 1.0, str(small): 1.0}  # a pass: 120 rows, 60 of each
    rows = _read(pass_items(mixture, passes=2, seed=3))
    again = _read(pass_items(mixture, passes=2, seed=3))
    assert rows["row"].tolist() == again["row"].tolist()  # the sample is seeded
    for p in range(2):
        sel = rows["pass"] == p
        small_rows = [k for k in rows["__key__"][sel] if k.startswith("s")]
        counts = Counter(small_rows)
        assert set(counts.values()) == {3} and len(counts) == 20  # 60 of 20 rows: 3 whole copies
        assert len(set(rows["row"][sel].tolist())) == int(sel.sum())  # copies are distinct rows
        big_rows = sum(k.startswith("b") for k in rows["__key__"][sel])
        assert abs(big_rows - 60) <= 4 * np.sqrt(60 * 0.4)  # Bernoulli(0.6) of 100, within 4 sd
    first, second = (set(rows["__key__"][(rows["pass"] == p)].tolist()) for p in (0, 1))
    assert {k for k in first if k.startswith("b")} != {k for k in second if k.startswith("b")}  # new sample per pass


# ---------------------------------------------------------------- kill and resume on a real Ray cluster


def _key_log(directory: Path) -> dict[int, list[dict]]:
    """{rank: the run's final trajectory}: a step written again after a restart replaces the first try's."""
    out = {}
    for path in sorted(directory.glob("rank*.jsonl")):
        steps: dict[int, dict] = {}
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            steps[entry["step"]] = entry
        out[int(path.stem[4:])] = [steps[s] for s in sorted(steps)]
    return out


def _per_pass(trajectories: dict[int, list[dict]], prefix: str = "") -> dict[int, list[int]]:
    rows: dict[int, list[int]] = {}
    for entries in trajectories.values():
        for entry in entries:
            for p, r in zip(entry[f"{prefix}pass"], entry[f"{prefix}row"]):
                rows.setdefault(p, []).append(r)
    return rows


def ray_train_worker_pids(processes) -> list[int]:
    """PIDs of the Ray Train worker processes among `processes` (psutil.Process objects)."""
    import psutil

    pids = []
    for proc in processes:
        try:
            if any("RayTrainWorker" in part for part in proc.cmdline()):
                pids.append(proc.pid)
        except psutil.Error:
            continue
    return pids


def _train_worker_pids() -> list[int]:
    """Ray Train worker processes of *this* test session's cluster (descendants of this process)."""
    import psutil

    return ray_train_worker_pids(psutil.Process(os.getpid()).children(recursive=True))


def kill_a_train_worker_when(ready, killed: list[int], poll_s: float = 0.1) -> threading.Thread:
    """A thread that SIGKILLs one Ray Train worker of this session as soon as `ready()` (within 400 s)."""

    def killer():
        deadline = time.time() + 400
        while time.time() < deadline and not killed:
            if ready():
                for pid in _train_worker_pids()[:1]:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(poll_s)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    return thread


def _kill_after(run_dir: str, checkpoint: str, killed: list[int]) -> threading.Thread:
    return kill_a_train_worker_when(lambda: os.path.isfile(os.path.join(run_dir, checkpoint, "meta.json")), killed)


def _resume_config(tmp_path, shards, name: str, steps: int, **train):
    from tests.test_train import micro_config

    cfg = micro_config(
        tmp_path, shards, steps=steps, run_name=name, checkpoint_every_steps=8, log_every_steps=8, **train
    )
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, deterministic=True),
        train=dataclasses.replace(cfg.train, key_log=str(tmp_path / f"keys-{name}")),
        tracking=dataclasses.replace(cfg.tracking, log_preview=False, log_checkpoints=False),
    )


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_killed_mid_pass_and_restarted_trains_each_row_once_and_ends_on_the_same_weights(
    ray_cluster, digit_shards, tmp_path
):
    """Deterministic mode, 1 worker: SIGKILL after the step-40 checkpoint (pass 1 has begun: 300 digits,
    8 per step), Ray Train restarts the worker; the run ends where an uninterrupted one does. The
    uninterrupted reference runs in the driver (train.num_workers=0): the same loop on the same stream,
    so it also checks that the two modes train batch for batch to the same weights."""
    from pipeline.checkpoints import load_state, read_meta
    from pipeline.train.trainer import run_pretrain
    from tests.test_train import BATCH, A, M

    steps = 56  # 448 rows: all of pass 0, half of pass 1
    # one torch thread in both (a Ray worker on half a CPU gets one): the same reduction order
    before = torch.get_num_threads()
    torch.set_num_threads(3)  # not 1, so that the run's own setting (1) outliving it in this process shows
    try:
        plain = run_pretrain(
            _resume_config(tmp_path, digit_shards, "plain", steps, num_workers=0, threads_per_worker=1)
        )
        assert torch.get_num_threads() == 3, "driver mode left the loop's thread count in the calling process"
    finally:
        torch.set_num_threads(before)
    cfg = _resume_config(tmp_path, digit_shards, "killed", steps, max_failures=1, threads_per_worker=1)
    killed: list[int] = []
    thread = _kill_after(os.path.join(cfg.train.storage_path, "killed"), "checkpoint_00000040", killed)
    resumed = run_pretrain(cfg)
    thread.join(timeout=5)
    assert killed, "the worker was never killed: the test did not exercise a restart"
    meta = read_meta(resumed["checkpoint"])
    assert meta["step"] == steps and meta["views_seen"] == steps * BATCH * (M + A)  # counters continue exactly

    ref, got = _key_log(tmp_path / "keys-plain")[0], _key_log(tmp_path / "keys-killed")[0]
    assert [e["step"] for e in got] == list(range(1, steps + 1))
    raw = (tmp_path / "keys-killed" / "rank0.jsonl").read_text().splitlines()
    assert len(raw) > steps, "the restarted worker did not replay the steps after the checkpoint"
    passes = _per_pass({0: got})
    assert sorted(passes[0]) == sorted(set(passes[0])) and len(passes[0]) == 300  # pass 0: every digit, once
    assert len(passes[1]) == len(set(passes[1])) == steps * 8 - 300  # pass 1: no row twice
    assert set(passes[1]) < set(passes[0])  # the same images (row ids are per file and position)
    assert [(e["pass"], e["row"]) for e in got] == [(e["pass"], e["row"]) for e in ref]  # batch for batch

    a, b = load_state(plain["checkpoint"]), load_state(resumed["checkpoint"])
    worst = max((a["objective"][k].float() - b["objective"][k].float()).abs().max().item() for k in a["objective"])
    assert worst <= 1e-6, f"resumed weights differ from the uninterrupted run's by {worst}"
    assert "resume_dropped_rows" not in resumed["metrics"], "the read tasks did not skip the trained-on rows"


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_two_workers_a_mixture_and_a_decoupled_stream_resume_each_pass_exactly_after_a_rerun(
    ray_cluster, digit_shards, photo_files, tmp_path
):
    """2 workers, propagation crops from a mixture, annotations from their own stream; the job dies
    (SIGKILL, no automatic restart) and is submitted again: every pass of each stream, each row once."""
    from pipeline.checkpoints import read_meta
    from pipeline.config import IngestConfig
    from pipeline.data.shards import write_shards
    from pipeline.train.trainer import run_pretrain
    from tests.test_train import BATCH, A, M

    photos = tmp_path / "photos"
    write_shards(
        [{"input": str(p), "id": p.stem} for p in photo_files], str(photos), "files", IngestConfig(samples_per_shard=4)
    )
    # 2 workers x 8 rows: 384 rows of each stream (the annotation stream's digits: all of pass 0, 84 of pass 1);
    # killed after the step-16 checkpoint, mid-pass 0 of both streams' digits: the rerun must skip rows of a pass
    steps = 24
    cfg = _resume_config(tmp_path, digit_shards, "pair", steps, num_workers=2, cpus_per_worker=0.25, max_failures=0)
    cfg = dataclasses.replace(
        cfg,
        data=dataclasses.replace(
            cfg.data,
            deterministic=False,
            mixture={str(digit_shards): 1.0, str(photos): 1.0},
            annotation_shards=str(digit_shards),
        ),
    )
    killed: list[int] = []
    thread = _kill_after(os.path.join(cfg.train.storage_path, "pair"), "checkpoint_00000016", killed)
    with pytest.raises(Exception):
        run_pretrain(cfg)  # the job dies with its worker
    thread.join(timeout=5)
    assert killed
    result = run_pretrain(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_failures=0)))
    assert result["metrics"]["step"] == steps
    meta = read_meta(result["checkpoint"])  # DDP: two workers, each step counts both workers' views
    assert meta["world_size"] == 2 and meta["views_seen"] == steps * 2 * BATCH * (M + A)
    assert result["metrics"]["loss_annotation"] > 0 and result["metrics"]["loss_propagation"] > 0

    logs = _key_log(tmp_path / "keys-pair")
    assert sorted(logs) == [0, 1] and all([e["step"] for e in t] == list(range(1, steps + 1)) for t in logs.values())
    for prefix in ("", "ann_"):
        passes = _per_pass(logs, prefix)
        assert sum(len(r) for r in passes.values()) == steps * 8 * 2
        for p, rows in passes.items():
            assert len(rows) == len(set(rows)), f"{prefix or 'train '}stream, pass {p}: a row trained on twice"
