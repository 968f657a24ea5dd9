#!/usr/bin/env bash
# Build the sdist and the wheel of every InferMesh distribution into dist/ with `python -m build`
# (each in its own isolated build environment), `twine check --strict` all of them, then install
# them all by name from dist/ in a fresh virtual environment and load every plugin.
#   scripts/build_dists.sh                 refuses if packages/ has uncommitted changes
#   scripts/build_dists.sh --allow-dirty   builds the working tree as it is (not for a release)
# Upload afterwards with `uv run twine upload dist/*` (see README, Releasing).
set -euo pipefail
cd "$(dirname "$0")/.."

allow_dirty=0
for arg in "$@"; do
  case "$arg" in
    --allow-dirty) allow_dirty=1 ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "build_dists: unknown argument '$arg' (see --help)" >&2; exit 2 ;;
  esac
done

UV="${UV:-uv}"
if ! command -v "$UV" >/dev/null 2>&1; then
  [ -x .tools/bin/uv ] && UV=.tools/bin/uv || { echo "build_dists: uv not found; run ./dev sync" >&2; exit 1; }
fi

# A build packs every file in the package folder, committed or not: a release must be built from
# exactly what is committed.
if [ "$allow_dirty" -eq 0 ] && [ -n "$(git status --porcelain -- packages LICENSE)" ]; then
  echo "build_dists: packages/ has uncommitted or untracked files; commit them or pass --allow-dirty:" >&2
  git status --short -- packages LICENSE >&2
  exit 1
fi

version="$("$UV" run --no-sync python scripts/set_version.py)" || {
  echo "build_dists: versions disagree; fix them with scripts/set_version.py X.Y.Z" >&2; exit 1; }

# build creates its isolated environments with uv when uv is on PATH (seconds instead of ~30 s each).
installer=()
uv_dir="$(dirname "$(command -v "$UV")")"
export PATH="$uv_dir:$PATH"
command -v uv >/dev/null 2>&1 && installer=(--installer uv)

rm -rf dist
packages=(packages/*/)
for package in "${packages[@]}"; do
  echo "== building ${package%/} $version"
  "$UV" run --no-sync python -m build "${installer[@]}" --outdir dist "$package"
done

expected=$(( ${#packages[@]} * 2 ))
found=$(find dist -maxdepth 1 \( -name "*-$version.tar.gz" -o -name "*-$version-py3-none-any.whl" \) | wc -l)
if [ "$found" -ne "$expected" ]; then
  echo "build_dists: expected $expected files for $version in dist/, found $found" >&2
  ls dist >&2
  exit 1
fi

echo "== twine check"
"$UV" run --no-sync twine check --strict dist/*

# Every wheel installs by name in a fresh virtual environment (ours only from dist/, third-party
# ones at uv.lock's versions) and every plugin loads there.
echo "== install check: all distributions from dist/ in a fresh virtual environment"
check_dir="$(mktemp -d)"
trap 'rm -rf "$check_dir"' EXIT
"$UV" export --frozen --no-hashes --all-packages --no-emit-workspace --format requirements-txt \
  --no-header --quiet --output-file "$check_dir/constraints.txt"
python="$("$UV" run --no-sync python -c 'import sys; print(sys.executable)')"
"$UV" venv --no-config --quiet --python "$python" "$check_dir/venv"
requirements=()
for package in "${packages[@]}"; do requirements+=("$(basename "$package")==$version"); done
dist_dir="$PWD/dist"
(cd "$check_dir" && "$UV" pip install --no-config --quiet --python venv/bin/python \
  --find-links "$dist_dir" --constraint constraints.txt "${requirements[@]}")
"$check_dir/venv/bin/infermesh" --strict-plugins --version
"$check_dir/venv/bin/python" - <<'PY'
from importlib.metadata import entry_points

for ep in sorted(entry_points(group="infermesh"), key=lambda ep: ep.name):
    ep.load()  # a plugin that cannot be imported from its wheel fails the release here
    print(f"  plugin {ep.name:<8} {ep.value:<28} {ep.dist.name} {ep.dist.version}")
for ep in entry_points(group="console_scripts", name="infermesh"):
    print(f"  console script infermesh = {ep.value} ({ep.dist.name})")
PY
ls -l dist
