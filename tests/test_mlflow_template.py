"""The test session's fresh MLflow stores (tests/mlflow_template.py) are MLflow's own: same schema, working."""

from __future__ import annotations

import sqlite3


def _schema(path) -> list[tuple]:
    with sqlite3.connect(path) as db:
        rows = db.execute("select type, name, sql from sqlite_master order by type, name").fetchall()
        version = db.execute("select version_num from alembic_version").fetchall()
    return rows + version


def test_a_fresh_store_is_a_copy_of_the_template_and_works(session_tmp, tmp_path):
    from mlflow.store.db import utils
    from mlflow.tracking import MlflowClient

    assert getattr(utils._initialize_tables, "from_template", False), "the session's template hook is not installed"
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.create_run(client.create_experiment("e"))
    client.log_metric(run.info.run_id, "loss", 1.5, step=3)
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [(3, 1.5)]
    template = session_tmp / "mlflow-template.db"
    assert template.exists() and len(_schema(template)) > 20
    assert _schema(tmp_path / "mlflow.db") == _schema(template)
