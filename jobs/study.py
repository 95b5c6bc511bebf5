"""Run (or resume) the scenes study (same as `abpipe study`; docs/study.md).

Local:   python jobs/study.py --arms ab_simclr,simclr --max-seeds 1
Cluster: ray job submit --address http://127.0.0.1:8265 --runtime-env cluster/runtime_env.yaml \\
           -- python jobs/study.py paths.root=/mnt/abpipe/study
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("study", __doc__))
