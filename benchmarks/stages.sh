#!/usr/bin/env bash
# The README's numbers for stages after pretraining (issue #14), measured with the shipped code:
#
#   1. SimCLR v2, MoCo v2 and SupCon, 3 seeds each: fine-tuning on 1% and 10% of the labels,
#      the linear probe on the same labels, supervised from scratch on the same labels (the same
#      network and budget), as `cl report` columns with mean ± std over the seeds;
#   2. SimCLR v2's ablation: fine-tuning from the first head layer (the recipe's) against from
#      the backbone (finetune.start_layer = 0);
#   3. distillation of the 10% network into a same-size and a half-width student, 3 seeds;
#   4. wall time of each stage (from the stages' summary.json) and of the whole shipped
#      pipeline recipe (`cl run recipes/simclr_v2_pipeline.toml`).
#
# Run it from the repository on an idle machine (every number is a wall time or depends on the
# thread count): about an hour on a 2-core CPU for the embedded glyphs. DATASETS="glyphs digits"
# adds scikit-learn's digits (shipped offline); PIPELINE=0 leaves out the pipeline's wall time
# (for runs on a machine that is not idle); SET="KEY=VALUE ..." adds overrides to every sweep
# (for a data set the recipes' augmentation does not suit). Results go to $OUT (default runs/stages-bench);
# the markdown tables are printed and written to $OUT/results.md. Rerunning resumes: finished
# runs and stages are not trained again.
set -euo pipefail

CL=${CL:-.venv/bin/cl}
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/stages-bench}
SEEDS=${SEEDS:-3}
DATASETS=${DATASETS:-glyphs}
PIPELINE=${PIPELINE:-1}
read -ra overrides <<<"${SET:-}"
RESULTS="$OUT/results.md"
mkdir -p "$OUT"
: >"$RESULTS"

say() { echo "$@" | tee -a "$RESULTS"; }

# The newest sweep folder under $1: the one the last `cl sweep` there wrote.
last_sweep() { ls -td "$1"/sweeps/*/ | head -1; }

# Run ids of a sweep folder, one a line.
run_dirs() {
    "$PY" - "$1" <<'EOF'
import json, sys
from pathlib import Path
folder = Path(sys.argv[1])
manifest = json.loads((folder / "manifest.json").read_text())
for entry in manifest["runs"]:
    print(folder.parent.parent / entry["run_dir"])
EOF
}

# Mean wall time of each kind of stage below a folder, from the stages' summary.json.
stage_walls() {
    "$PY" - "$1" <<'EOF'
import json, statistics, sys
from collections import defaultdict
from pathlib import Path
walls = defaultdict(list)
for summary in Path(sys.argv[1]).rglob("stages/*/summary.json"):
    s = json.loads(summary.read_text())
    walls[s["column"].removesuffix("_top1")].append(s["wall_s"])
print("| stage | runs | wall (training) mean ± std |")
print("|---|---|---|")
for column, values in sorted(walls.items()):
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    print(f"| {column} | {len(values)} | {statistics.fmean(values):.1f} ± {std:.1f} s |")
EOF
}

for dataset in $DATASETS; do
    data=(--set "data.dataset=\"$dataset\"")
    for item in "${overrides[@]}"; do data+=(--set "$item"); done
    out="$OUT/$dataset"
    say "## $dataset"
    for recipe in simclr_v2 moco supcon; do
        stages='["finetune", "linear", "supervised"]'
        [ "$recipe" = simclr_v2 ] && stages='["finetune", "linear", "supervised", "distill"]'
        cmd=("$CL" sweep "recipes/$recipe.toml" --seeds "$SEEDS" --out "$out" "${data[@]}"
            --set "stages.run=$stages" --set "stages.fractions=[0.01, 0.1]")
        say ""
        say "### $recipe: \`${cmd[*]}\`"
        "${cmd[@]}"
        sweep=$(last_sweep "$out")
        if [ "$recipe" = simclr_v2 ]; then
            # 2. the head-layer ablation and 3. the half-width student, on every seed's run
            for run in $(run_dirs "$sweep"); do
                "$CL" eval "$run" --finetune 0.01,0.1 --set finetune.start_layer=0 --quiet
                "$CL" eval "$run" --distill --set distill.width=16 --quiet
            done
            say "(and on each run: \`cl eval RUN --finetune 0.01,0.1 --set finetune.start_layer=0\`, \`cl eval RUN --distill --set distill.width=16\`)"
        fi
        say ""
        "$CL" report "$sweep" --format markdown | tee -a "$RESULTS"
    done
    say ""
    say "### wall time per stage ($dataset)"
    stage_walls "$out" | tee -a "$RESULTS"
done

[ "$PIPELINE" = 1 ] || exit 0
say ""
say "## the shipped pipeline: \`cl run recipes/simclr_v2_pipeline.toml\`"
start=$(date +%s.%N)
"$CL" run recipes/simclr_v2_pipeline.toml --out "$OUT/pipeline" --force --quiet
end=$(date +%s.%N)
say "whole command: $(echo "$end - $start" | bc) s"
