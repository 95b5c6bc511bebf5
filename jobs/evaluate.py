"""Evaluate a checkpoint with frozen-feature probes, as an MLflow run nested under its pretraining run
(same as `abpipe eval`).

Local:   python jobs/evaluate.py --config jobs/configs/tiny.yaml eval.checkpoint=<run id> eval.dataset=/data/labelled
Cluster: ray job submit --address http://127.0.0.1:8265 --runtime-env cluster/runtime_env.yaml \\
           -- python jobs/evaluate.py eval.checkpoint=<MLflow run id> eval.dataset=/data/labelled eval.use_gpu=true
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("eval", __doc__))
