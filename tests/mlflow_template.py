"""Fresh sqlite MLflow stores, built once per test session.

MLflow builds a new sqlite store by running its whole chain of schema migrations (about 1.3 s of CPU on
an idle 2-core host, 2.6 s beside a busy job), and most tests start from an empty root, so a full run
builds dozens. The test session runs the migrations once, into a template file, and copies the template
into each new store with sqlite's own backup API: the schema and rows are the ones MLflow wrote. Stores
built in other processes (a CLI subprocess, a notebook's kernel, a Ray worker) and non-sqlite stores (the
production tests' PostgreSQL) still take MLflow's own path.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path


def build_fresh_stores_from(template: Path) -> bool:
    """Install the copy in this process; False (and nothing changed) if this MLflow has no such hook."""
    from mlflow.store.db import utils

    migrate = getattr(utils, "_initialize_tables", None)
    if migrate is None or getattr(migrate, "from_template", False):
        return False
    lock = threading.Lock()

    def initialize(engine) -> None:
        if engine.dialect.name != "sqlite" or engine.url.database in (None, "", ":memory:"):
            return migrate(engine)
        with lock:
            if not template.exists():
                import sqlalchemy

                built = sqlalchemy.create_engine(f"sqlite:///{template}")
                try:
                    migrate(built)
                finally:
                    built.dispose()
        source, target = sqlite3.connect(template), engine.raw_connection()
        try:
            source.backup(target.driver_connection)
        finally:
            target.close()
            source.close()

    initialize.from_template = True
    utils._initialize_tables = initialize
    return True
