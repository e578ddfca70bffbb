#!/usr/bin/env bash
# Fill a wheelhouse for an offline image build: resolve pyproject.toml's dependencies with this
# machine's pip (its index, mirror and constraints), then fetch or build one wheel per package.
# The image build then installs from it with --no-index (docker/install-python.sh).
#
#   docker/make-wheelhouse.sh [OUT]        default OUT: docker/wheels
#
# Env: WHEELHOUSE_EXCLUDE  package names left out, space-separated. Default "triton": torch's
#                          GPU kernel compiler (~0.9 GB), used only by torch.compile on CUDA.
#      PYTHON              the interpreter whose pip resolves (default python3.11; it must match
#                          the image's Python 3.11 on x86_64 Linux)
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$root/docker/wheels}"
exclude="${WHEELHOUSE_EXCLUDE-triton}"
python="${PYTHON:-python3.11}"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$out"

echo "make-wheelhouse: resolving $root/pyproject.toml"
"$python" -m pip install --quiet --dry-run --ignore-installed --report "$tmp/report.json" "$root"
"$python" - "$tmp/report.json" "$exclude" >"$tmp/requirements.txt" <<'PY'
import json
import sys

report = json.load(open(sys.argv[1]))
excluded = {name.lower() for name in sys.argv[2].split()}
for item in report["install"]:
    name, version = item["metadata"]["name"], item["metadata"]["version"]
    key = name.lower().replace("_", "-")
    if key == "ace-correspondence" or key in excluded:
        continue  # the project itself is installed from source in the image
    print(f"{name}=={version}")
PY
echo "make-wheelhouse: $(wc -l <"$tmp/requirements.txt") packages (left out: ${exclude:-none})"
# pip wheel takes a wheel as it is and builds one for an sdist-only package
"$python" -m pip wheel --quiet --no-deps --wheel-dir "$out" -r "$tmp/requirements.txt"
cp "$tmp/requirements.txt" "$out/requirements.txt"
echo "make-wheelhouse: $(du -sh "$out" | cut -f1) in $out"
