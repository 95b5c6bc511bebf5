"""Run an evaluation sweep over checkpoints (same as `abpipe sweep`).

Local:   python jobs/sweep.py --config jobs/configs/tiny.yaml --runs RUN_ID[,RUN_ID...]
Cluster: ray job submit --address http://127.0.0.1:8265 --runtime-env cluster/runtime_env.yaml \\
           -- python jobs/sweep.py --runs RUN_ID[,RUN_ID...] eval.use_gpu=true
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("sweep", __doc__))
