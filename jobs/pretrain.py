"""Pretrain AB_SimCLR on shards with Ray Train (same as `abpipe train`); resumes from the latest checkpoint.

Local:   python jobs/pretrain.py --config jobs/configs/tiny.yaml data.shards=/data/shards/x
Cluster: ray job submit --address http://127.0.0.1:8265 --runtime-env cluster/runtime_env.yaml \\
           -- python jobs/pretrain.py --config jobs/configs/ab_simclr_vit_s16_800m.yaml \\
              data.shards=s3://bucket/shards/cc12m train.storage_path=s3://bucket/abpipe/ray_results
Re-submitting with the same train.storage_path and train.run_name resumes the run.
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("train", __doc__))
