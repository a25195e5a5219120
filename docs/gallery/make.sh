#!/usr/bin/env bash
# Regenerate the README gallery from a real sweep: MoCo's momentum on the embedded glyphs,
# 4 values x 3 seeds by default (12 runs of the 2-3 minute default recipe).
#
#   docs/gallery/make.sh --seeds 2 --set epochs=10   # the README's gallery, into docs/gallery/
#   GALLERY_DEST=/tmp/g docs/gallery/make.sh --seeds 1 --set epochs=1 --set data.num_train=256
#                                               # a quick check: extra arguments go to `cl sweep`
#
# Writes momentum.svg, momentum.png, momentum.md (the markdown table), momentum.tex (LaTeX)
# and momentum.html into $GALLERY_DEST (default: this folder). The runs go to $GALLERY_OUT
# (default: runs/gallery); re-running skips the finished ones.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cl=("${PYTHON:-$root/.venv/bin/python}" -m cltool)
out=${GALLERY_OUT:-runs/gallery}  # relative to the repository, as the tables print it
dest=${GALLERY_DEST:-$here}
sweep=(sweep recipes/moco.toml --param m=0,0.9,0.99,0.999 --seeds 3 --out "$out" "$@")

cd "$root"
mkdir -p "$dest"
folder=$("${cl[@]}" "${sweep[@]}" --dry-run | sed -n 's/^dry run: nothing submitted; sweep folder would be //p')
"${cl[@]}" "${sweep[@]}"
"${cl[@]}" report "$folder" --plot "$dest/momentum.svg" --html "$dest/momentum.html" \
    --format markdown -o "$dest/momentum.md"
"${cl[@]}" report "$folder" --plot "$dest/momentum.png" --format latex -o "$dest/momentum.tex"
echo "gallery: $dest/momentum.{svg,png,md,tex,html} from $folder"
