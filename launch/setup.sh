#!/usr/bin/env bash
# One-command set-up: a virtual environment in .venv with this package (editable) and its test tools.
#   bash launch/setup.sh            # .venv for training and tests (CPU JAX)
#   bash launch/setup.sh --torch    # also .venv-torch: PyTorch + open_clip + timm for export parity tests
#   EXTRAS=gpu bash launch/setup.sh # CUDA 12 JAX instead of CPU JAX (EXTRAS=tpu on TPU VMs)
#   bash launch/setup.sh --libtpu   # + libtpu (for the installed jax): --mode=compile for TPU
#                                   # topologies from this machine, no TPU needed
#   PYTHON=python3.12 VENV=.venv-newest bash launch/setup.sh --upgrade
#                                   # another interpreter and folder; --upgrade takes the newest
#                                   # release of every dependency (also in an existing folder)
#   bash launch/setup.sh --lower-bounds   # JAX libraries at pyproject's lower bounds (CI)
# PyTorch lives in its own environment because training never needs it and its CUDA build is large.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
venv=${VENV:-.venv}
extras=${EXTRAS:-test}
upgrade=()
if [[ " $* " == *" --upgrade "* ]]; then
  upgrade=(--upgrade --upgrade-strategy eager)
fi
if [[ " $* " == *" --lower-bounds "* ]]; then
  upgrade+=(--constraint .ci/lower_bounds.txt)  # the lowest versions pyproject.toml allows
fi

if [[ ! -x $venv/bin/python ]]; then
  "$python" -m venv "$venv"
fi
"$venv"/bin/python -m pip install -q --upgrade pip
"$venv"/bin/python -m pip install -q "${upgrade[@]}" -e ".[${extras}]"
echo "set-up: $venv ready ($("$venv"/bin/python -c 'import sys, jax, flax, optax, orbax.checkpoint as ocp, grain
print(f"python {sys.version.split()[0]}, jax {jax.__version__}, flax {flax.__version__}, optax {optax.__version__}, orbax-checkpoint {ocp.__version__}, grain {grain.__version__}")'))"
if [[ " $* " == *" --libtpu "* ]]; then
  # jax[tpu] of the installed version: libtpu without changing jax.
  jax_version=$("$venv"/bin/python -c 'import jax; print(jax.__version__)')
  "$venv"/bin/python -m pip install -q "jax[tpu]==$jax_version"
fi
# WordNet for CatLIP's caption labels, into $venv/nltk_data (offline on Debian/Ubuntu).
"$venv"/bin/python -m pretrain.data.synsets.wordnet

if [[ " $* " == *" --torch "* ]]; then
  torch_python=${TORCH_PYTHON_BASE:-python3.11}
  if [[ ! -x .venv-torch/bin/python ]]; then
    "$torch_python" -m venv .venv-torch
  fi
  # These torch/torchvision versions import together (PyPI's newest torchvision may not match).
  # transformers: the DPT depth expert of the CLIPTeX pseudo-labels; geffnet: the layout the
  # NLL-AngMF normals checkpoints were saved in (its tests compare against it).
  .venv-torch/bin/python -m pip install -q --upgrade pip
  .venv-torch/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1 open_clip_torch timm \
    safetensors numpy ftfy regex transformers geffnet
  echo "set-up: .venv-torch ready ($(.venv-torch/bin/python -c 'import torch, open_clip, timm, transformers, geffnet; print("torch", torch.__version__, "open_clip", open_clip.__version__, "timm", timm.__version__, "transformers", transformers.__version__)'))"
fi
