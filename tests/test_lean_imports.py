"""What the processes of a training job import before they do anything.

A Ray Train job starts a dozen processes, each importing what it is handed: Ray Train's DatasetManager and
SplitCoordinator unpickle the Dataset's plan (the cropper class, the read function), the run's counter actors
their classes, and the driver hands TorchTrainer the loop. On a 2-core host each torch import is ~3 s of CPU
on a job's critical path, so these modules stay free of torch, OpenCV and timm: the cropper imports them
when it is built, the loop in the workers that run it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "cv2", "torchvision", "timm", "pipeline.train.loop", "pipeline.models.encoder")


def test_the_plan_the_counters_and_the_loop_handle_import_no_torch():
    code = (
        "import sys, ray.cloudpickle as cp\n"
        "import pipeline.data.crop_stage, pipeline.data.crop_stats, pipeline.data.passes, pipeline.train.trainer\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
        "print(len(cp.dumps(pipeline.train.trainer._train_loop_per_worker)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    loaded, size = out.stdout.splitlines()[-2:]
    assert loaded == "[]", out.stdout + out.stderr
    assert int(size) < 200, "TorchTrainer's entry point is pickled by value, not by its name"
