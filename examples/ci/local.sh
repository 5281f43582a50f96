#!/usr/bin/env bash
# The CI pipeline of examples/ci/github-actions.yml and examples/ci/gitlab-ci.yml, executed locally: train a
# recipe with quality gates, re-check the gates, export and bundle the release, verify the bundle, pack it.
# Every step is a distillctl verb with --json; the exit code of a failed step is the script's (see README: 2 bad
# input, 3 a gate or verification failed, 4 preempted), so a CI job fails exactly when distillctl says so.
#
#   examples/ci/local.sh                                  # quickstart recipe, default gates, into ./ci-out/
#   RECIPE=recipes/smd_cpu.yaml MIN_KNN=80 examples/ci/local.sh
#   EXTRA_SET="--set train.epochs=1" examples/ci/local.sh # any further recipe overrides
#
# Environment: RECIPE (name or YAML path, default quickstart), OUT (default ci-out), MIN_KNN (student kNN top-1 %,
# default 50), MIN_RATIO (student/teacher kNN, default 0.5), MAX_INT8_DROP (points, default 3), MAX_LATENCY_MS
# (ONNX batch 1, one thread, default 100), EXTRA_SET, DISTILLCTL (the command, default distillctl),
# DISTILLCTL_HOME (teacher downloads; cache it between CI runs).
set -euo pipefail

RECIPE="${RECIPE:-quickstart}"
OUT="${OUT:-ci-out}"
DISTILLCTL="${DISTILLCTL:-distillctl}"
read -r -a EXTRA <<< "${EXTRA_SET:-}"
RUN_DIR="$OUT/run"
BUNDLE="$OUT/bundle"
mkdir -p "$OUT"

step() { printf '\n== %s\n' "$*" >&2; }

step "1/5 train and evaluate $RECIPE with quality gates (exit 3 when a gate fails)"
$DISTILLCTL run --recipe "$RECIPE" --out "$RUN_DIR" --export onnx,onnx-int8 \
    --set gates.min_student_knn="${MIN_KNN:-50}" \
    --set gates.min_student_teacher_ratio="${MIN_RATIO:-0.5}" \
    --set gates.max_int8_drop="${MAX_INT8_DROP:-3}" \
    --set gates.max_latency_ms="${MAX_LATENCY_MS:-100}" \
    --set gates.latency.format=onnx --set gates.latency.batch=1 --set gates.latency.threads=1 \
    "${EXTRA[@]}" --json > "$OUT/summary.json"

step "2/5 re-check the gates on the finished run (no retraining)"
$DISTILLCTL gate "$RUN_DIR" --json > "$OUT/gates.json"

step "3/5 export and bundle the release (ONNX fp32 + INT8, model card, samples, sha256 manifest)"
rm -rf "$BUNDLE"
$DISTILLCTL export "$RUN_DIR" --format onnx,onnx-int8 --bundle "$BUNDLE" --json > "$OUT/export.json"

step "4/5 verify the bundle (re-hash every file, re-run parity on the samples)"
$DISTILLCTL verify "$BUNDLE" --json > "$OUT/verify.json"

step "5/5 pack the artefact (reproducible: sorted names, fixed times and owners)"
tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf - -C "$BUNDLE" . | gzip -n > "$OUT/release.tar.gz"

python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
summary = json.load(open(f"{out}/summary.json"))
gates = json.load(open(f"{out}/gates.json"))
print(f"student kNN {summary['student']['knn_top1']:.2f}% (teacher {summary['teacher']['knn_top1']:.2f}%), "
      f"gates passed: {gates['passed']} ({gates['checked']} checked); release: {out}/release.tar.gz", file=sys.stderr)
PY
