#!/usr/bin/env bash
# The curves study of issue 26 (docs/study.md, "The budget grows"), in the order that covers the most with the
# least compute: every stage is one `abpipe study` (the dense preset; the last two on the default scenes;
# resumable: a finished row is skipped, an
# interrupted run resumes from its last checkpoint), so re-running this script carries on where it stopped.
#   ROOT=/data/abpipe_curves bash benchmarks/curves_study.sh        # default ROOT: ./abpipe_curves
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=${ROOT:-abpipe_curves}
ABPIPE=${ABPIPE:-.venv/bin/abpipe}
run_stage() { # arms max_seeds [more flags and overrides]
  echo "[curves] $(date -u +%FT%TZ) stage: $1 (seeds <= $2) ${*:3}"
  "$ABPIPE" study --arms "$1" --max-seeds "$2" paths.root="$ROOT" "${@:3}" || echo "[curves] stage failed: $1"
}
stage() { run_stage "$1" "$2" --preset dense; }
# the check on the 1-3-object scenes (no preset: the default scenes), with the preset's curve inside each run
sparse() { run_stage "$1" "$2" train.checkpoint_fraction=0.1; }
stage ab_simclr,simclr 2
stage ab_simclr_3x,simclr_3x 1
stage ab_objects_to_scenes,simclr_mix,dino_mix 1
stage ab_simclr,simclr 3
stage ab_simclr_10x,simclr_10x 1
stage ab_simclr_3x,simclr_3x 2
stage ab_objects_to_scenes,simclr_mix,dino_mix 2
stage ab_objects_to_scenes_10x,simclr_10x_mix,dino_10x_mix 1
stage ab_simclr_10x,simclr_10x 2
sparse simclr_10x,ab_simclr_10x 1
sparse ab_simclr,simclr 1
stage ab_objects_to_scenes_10x,simclr_10x_mix 2  # the decoupled 10x arms' second seeds (DINO collapsed: one)
echo "[curves] $(date -u +%FT%TZ) all stages done"
