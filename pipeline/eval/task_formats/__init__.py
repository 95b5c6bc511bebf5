"""One adapter per dataset's official on-disk layout; `pipeline.eval.tasks` is the registry over them."""
