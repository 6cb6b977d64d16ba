#!/usr/bin/env bash
# DiffusionOPD stage 2 on a Cloud TPU VM pod slice: create it, install, run on every worker.
#
#   TPU_NAME=opd ZONE=us-central2-b ACCELERATOR=v4-32 REPO=https://github.com/you/opd_jax \
#   BASE=/mnt/models/sd35m TEACHERS="('/mnt/a/GenEvalTeacher','/mnt/a/OCRTeacher','/mnt/a/AesTeacher')" \
#   CACHE=/mnt/data/opd_prompt_cache WORKDIR=/mnt/runs/opd_sd35m  bash launch/tpu_pod.sh [create|install|run|all]
#
# Paths must be visible on every worker (a mounted bucket or disk). jax.distributed finds the
# pod's coordinator itself on TPU VMs; OPD_DISTRIBUTED=1 makes opd_jax call it.
set -euo pipefail
: "${TPU_NAME:?}" "${ZONE:?}" "${ACCELERATOR:=v4-32}" "${RUNTIME:=tpu-ubuntu2204-base}"
: "${REPO:?git URL of this repository}" "${BRANCH:=main}" "${JAX_TPU_SPEC:=jax[tpu]==0.10.2}"
: "${CONFIG:=configs/opd_sd35m.py}" "${WORKDIR:=runs/opd_sd35m}" "${EXTRA_FLAGS:=}"
STEP="${1:-all}"

on_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$1"
}

if [[ "$STEP" == create || "$STEP" == all ]]; then
  gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" \
    --accelerator-type "$ACCELERATOR" --version "$RUNTIME"
fi
if [[ "$STEP" == install || "$STEP" == all ]]; then
  # requirements.txt pins the CPU torch wheel (parity references, text encoding) and CPU jax;
  # the TPU build of the same jax version replaces the latter.
  on_all "set -e; [ -d opd_jax ] || git clone -b $BRANCH $REPO opd_jax; cd opd_jax; git pull -q;
          python3 -m venv .venv; . .venv/bin/activate; pip install -q --upgrade pip;
          pip install -q \$(grep -E '^torch==' requirements.txt);
          pip install -q -r requirements.txt; pip install -q '$JAX_TPU_SPEC'"
fi
if [[ "$STEP" == run || "$STEP" == all ]]; then
  on_all "cd opd_jax && . .venv/bin/activate && OPD_DISTRIBUTED=1 python -m opd_jax.main \
    --config=$CONFIG --workdir=$WORKDIR --config.base.path=$BASE \
    --config.teachers.paths=\"$TEACHERS\" --config.data.embeddings_dir=$CACHE $EXTRA_FLAGS"
fi
