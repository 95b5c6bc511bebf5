"""Ingest a source into WebDataset shards + manifest.parquet + _stats.json (same as `abpipe ingest`).

Local:   python jobs/ingest.py --config jobs/configs/coco.yaml ingest.input=/data/coco/train2017
Cluster: ray job submit --address http://127.0.0.1:8265 --runtime-env cluster/runtime_env.yaml \\
           -- python jobs/ingest.py --config jobs/configs/cc12m.yaml \\
              ingest.input=s3://bucket/cc12m.tsv ingest.output=s3://bucket/shards/cc12m
Re-running with the same ingest.output continues an interrupted ingest.
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("ingest", __doc__))
