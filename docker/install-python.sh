#!/usr/bin/env bash
# Runs inside the image build (builder stage): a fresh virtualenv with the project and its
# dependencies, at the pins of pyproject.toml.
#
#   install-python.sh VENV SRC WHEELS [TORCH_INDEX_URL]
#
# Offline: when WHEELS/requirements.txt exists (written by docker/make-wheelhouse.sh), every
#          package comes from WHEELS with --no-index; nothing is downloaded.
# Online:  torch and torchvision at pyproject's pins from TORCH_INDEX_URL (the PyTorch CPU index
#          for the CPU image; empty = PyPI, whose Linux wheels are the CUDA builds), then the
#          project and the rest of its dependencies from PyPI.
set -euo pipefail

venv="$1" src="$2" wheels="$3" torch_index="${4:-}"

python3.11 -m venv "$venv"
pip=("$venv/bin/python" -m pip --no-cache-dir --disable-pip-version-check)

if [[ -f "$wheels/requirements.txt" ]]; then
    echo "install-python: offline, $(grep -c '==' "$wheels/requirements.txt") pinned wheels from the wheelhouse"
    # The requirements file is a complete resolution (minus what was left out on purpose, see
    # make-wheelhouse.sh), so --no-deps: pip must not go looking for the left-out packages.
    "${pip[@]}" install --no-index --find-links "$wheels" --no-deps -r "$wheels/requirements.txt"
    "${pip[@]}" install --no-index --no-deps --no-build-isolation "$src"
else
    if [[ -n "$torch_index" ]]; then
        # torch==X matches X+cpu (a local version label), so the later install keeps this build.
        read -r -a torch_pins < <("$venv/bin/python" - "$src/pyproject.toml" <<'PY'
import sys, tomllib
deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
print(" ".join(d for d in deps if d.split("==")[0].strip() in ("torch", "torchvision")))
PY
)
        echo "install-python: ${torch_pins[*]} from $torch_index"
        "${pip[@]}" install --index-url "$torch_index" "${torch_pins[@]}"
    fi
    echo "install-python: the project and its dependencies from the package index"
    "${pip[@]}" install "$src"
fi
"$venv/bin/python" -c "import ace_model, training, service; print('install-python: imports ok')"
