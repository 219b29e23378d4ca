#!/usr/bin/env bash
# CLIPTeX (paper 003) at :runlocal scale, end to end, after the Quick start's CLIP run
# (workdirs/clip_runlocal): every step is a command of the README; running the script again
# resumes each run where it stopped (a finished one has nothing left to do).
#
#   bash launch/cliptex_runlocal.sh            # then read workdirs/cliptex_summary.txt
#
# 1. Three experts: dense fine-tunes of that CLIP (PSPNet heads) on the embedded dense scenes'
#    8,000 labelled scenes: segmentation, depth (L1 in scene units) and normals.
# 2. CLIP-FT (:baseline) and CLIPTeX fine-tunes of the CLIP on 10,000 other scenes (the
#    'unlabelled' config), which the experts pseudo-label first (workdirs/cliptex_scenes).
# 3. Linear probes of both fine-tuned towers on the 500 held-out dense scenes, for all three
#    targets; zero-shot accuracy of both from their own evaluations.
set -euo pipefail
cd "$(dirname "$0")/.."
python=.venv/bin/python
runs=workdirs

train() {  # train WORKDIR ARGS...
  local workdir=$1
  shift
  "$python" -m pretrain.main --workdir="$workdir" "$@"
}

for target in segmentation depth normals; do
  loss=()
  [[ $target == depth ]] && loss=(--config.dense.loss=l1)  # an expert predicts depth itself
  train "$runs/cliptex_experts/$target" \
    --config="configs/dense_probe.py:runlocal,task=$target,head=pspnet,mode=finetune" "${loss[@]}"
done

train "$runs/clip_ft_runlocal" --config=configs/cliptex.py:runlocal,baseline
train "$runs/cliptex_runlocal" --config=configs/cliptex.py:runlocal

for run in clip_ft_runlocal cliptex_runlocal; do
  for target in segmentation depth normals; do
    train "$runs/probe_${run}_$target" \
      --config="configs/dense_probe.py:runlocal,task=$target,head=linear" \
      --config.tower.workdir="$runs/$run" --config.tower.config=configs/cliptex.py:runlocal
  done
done

"$python" - "$runs" <<'EOF' | tee "$runs/cliptex_summary.txt"
import csv, sys
from pathlib import Path

runs = Path(sys.argv[1])

def last(workdir, name):
    """The metric's value at the run's last step (metrics.csv: step, name, value, wall_time)."""
    rows = [r for r in csv.DictReader(open(workdir / "metrics.csv")) if r["name"] == name]
    return float(rows[-1]["value"]) if rows else float("nan")

metrics = {"segmentation": "eval/scenes/miou", "depth": "eval/scenes/abs_rel",
           "normals": "eval/scenes/within_30"}
print(f"{'':24s}{'CLIP-FT':>10s}{'CLIPTeX':>10s}")
for target, name in metrics.items():
    values = [last(runs / f"probe_{run}_{target}", name)
              for run in ("clip_ft_runlocal", "cliptex_runlocal")]
    print(f"{target + ' ' + name.split('/')[-1]:24s}{values[0]:10.4f}{values[1]:10.4f}")
values = [last(runs / run, "eval/scenes/zeroshot_top1")
          for run in ("clip_ft_runlocal", "cliptex_runlocal")]
print(f"{'zero-shot top-1':24s}{values[0]:10.4f}{values[1]:10.4f}")
EOF
