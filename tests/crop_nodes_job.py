"""Run by tests/test_crop_nodes.py in its own process: a 3-node local Ray cluster (ray.cluster_utils)
whose "crop" node (custom resource `crop_node`, label node-group=crop) and "train" node (custom
resource `train_node`) are told apart by resources; a short pretraining run with
`views.resources` / `train.resources_per_worker`, then the crop stage alone with
`views.label_selector`. Prints one JSON line: node ids and where each actor ran (Ray's state API).

Its own process because a driver holds one Ray connection, and the test session's shared local
instance must stay up for the tests after this one.

    python -m tests.crop_nodes_job SHARDS ROOT
"""

from __future__ import annotations

import dataclasses
import json
import sys


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def actors() -> list[tuple[str, str, str]]:
    """(class name, repr name, node id) of every actor the cluster ran, dead ones included."""
    from ray.util.state import list_actors

    return [
        (a.class_name, a.repr_name or "", a.node_id)
        for a in list_actors(detail=True, limit=10_000, raise_on_missing_output=False)
    ]


def actor_nodes(class_name: str) -> list[str]:
    """Nodes of the actors of a class; Ray Data's map workers are listed as `MapWorker(<its operators>)`
    (`_MapWorker` in older Ray), so that name matches by prefix."""
    if class_name == "_MapWorker":
        return [node for name, _, node in actors() if name == "_MapWorker" or name.startswith("MapWorker(")]
    return [node for name, _, node in actors() if name == class_name]


def main(shards: str, root: str) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from pipeline.config import Config, DataConfig, PathsConfig, RayConfig, TrainConfig, ViewsConfig
    from pipeline.data.crop_stage import build_crop_dataset, crop_pool_size
    from pipeline.data.shards import read_shards
    from pipeline.train.trainer import run_pretrain
    from tests.micro import MICRO_MODEL

    # The head runs no tasks; its dashboard (loopback, a free port) serves the state API read below.
    head = {"num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": free_port()}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    try:
        crop = cluster.add_node(num_cpus=2, resources={"crop_node": 1}, labels={"node-group": "crop"})
        train = cluster.add_node(num_cpus=2, resources={"train_node": 1})
        ray.init(address=cluster.address, logging_level="ERROR")
        ray.data.DataContext.get_current().enable_progress_bars = False
        batch, m, a, steps = 8, 3, 2, 4
        views = ViewsConfig(
            num_views=m,
            view_size=32,
            annotation_views=a,
            batch_size=16,
            cpus_per_actor=1.0,
            resources={"crop_node": 0.01},
        )
        cfg = Config(
            paths=PathsConfig(root=root),
            ray=RayConfig(address=cluster.address),
            data=DataConfig(shards=shards, shuffle_buffer=16),
            views=views,
            model=MICRO_MODEL,
            train=TrainConfig(
                total_views=steps * batch * (m + a),
                batch_size=batch,
                checkpoint_every_steps=100,
                log_every_steps=1,
                cpus_per_worker=1.0,
                resources_per_worker={"train_node": 1.0},
                run_name="crop-nodes",
            ),
        ).resolved()
        pool = crop_pool_size(cfg.views)
        result = run_pretrain(cfg)
        crop_actors = actor_nodes("_MapWorker")
        train_workers = actor_nodes("RayTrainWorker")

        by_label = dataclasses.replace(views, resources={}, label_selector={"node-group": "crop"}, concurrency=1)
        rows = build_crop_dataset(read_shards(shards), by_label, seed=0, stats_name="by-label").take(4)
        label_actors = actor_nodes("_MapWorker")  # the run's crop actors and this stage's
        print(
            json.dumps(
                {
                    "crop_node": crop.node_id,
                    "train_node": train.node_id,
                    "pool_size": pool,
                    "step": result["metrics"].get("step"),
                    "crop_actor_nodes": crop_actors,
                    "train_worker_nodes": train_workers,
                    "label_actor_nodes": label_actors,
                    "label_rows": len(rows),
                    "actors": actors(),
                }
            )
        )
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
