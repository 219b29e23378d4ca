#!/usr/bin/env bash
# CI's newest-JAX leg: Python 3.12 with the newest jax / flax / optax / orbax-checkpoint / grain
# that pyproject.toml allows, as Colab and new TPU VMs have them (there jax.pmap
# runs through jit + shard_map and jax.make_mesh defaults to Explicit axes). It runs what proves
# the library works there: the losses under shard_map, pmap and Explicit-axis meshes, the
# sharded train step and exact gradient accumulation, a run killed and resumed from its
# checkpoint, the open_clip export against open_clip, the fit report (libtpu for jax 0.12.1,
# 0.0.53, is not on the registry here: the TPU-topology compile is tested in the main leg);
# then the README's :runlocal main job for a few steps and its resumption.
#   bash .ci/newest_jax.sh set-up    # .venv-newest (PYTHON, default python3.12)
#   bash .ci/newest_jax.sh tests
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-.venv-newest}
tests=(
  tests/test_losses.py
  tests/test_train_step.py::test_sharded_step_equals_single_device_step
  tests/test_train_step.py::test_gradient_accumulation_is_exact_for_contrastive_loss
  tests/test_trainer.py::test_kill_and_resume_gives_identical_parameters
  "tests/test_export_open_clip.py::test_open_clip_loads_the_export_and_matches[small]"
  "tests/test_export_open_clip.py::test_open_clip_weights_import_into_jax_and_match[small]"
  tests/test_compile_fit.py
)

case ${1:-} in
  set-up)
    # PYENV_VERSION picks pyenv's 3.12 where python3.12 is a pyenv shim (these machines).
    PYENV_VERSION=${PYENV_VERSION:-3.12.1} PYTHON=${PYTHON:-python3.12} VENV=$venv \
      bash launch/setup.sh --upgrade
    ;;
  tests)
    # One compilation cache for the tests and the runs after them.
    export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$(mktemp -d)} JAX_PLATFORMS=cpu
    env REQUIRE_TORCH_ENV=1 "$venv"/bin/python -m pytest -m "not nightly" \
      "${tests[@]}"
    workdir=$(mktemp -d)
    main=("$venv"/bin/python -m pretrain.main --config=configs/clip_vitb16.py:runlocal
      --workdir="$workdir" --config.log_every_steps=5 --config.eval.every_steps=10
      --config.data.train.scenes_config=tiny --config.eval.sets.scenes.scenes_config=tiny)
    "${main[@]}" --config.total_steps=10
    "${main[@]}" --config.total_steps=15 2>&1 | tee "$workdir/resumed.log"
    grep -q "resumed from checkpoint at step 10" "$workdir/resumed.log"
    grep -q "^15,eval/scenes/zeroshot_top1," "$workdir/metrics.csv"
    echo "newest JAX: main job trained, evaluated, resumed ($workdir)"
    ;;
  *)
    sed -n '10,11p' "$0"
    exit 2
    ;;
esac
