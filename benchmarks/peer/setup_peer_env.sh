#!/usr/bin/env bash
# Create the peer virtualenv for the trl DDPOTrainer comparison (benchmarks/peer/trl_ddpo.py).
#
#   benchmarks/peer/setup_peer_env.sh [VENV_DIR]      # default: .venv-peer in the repository root
#
# Idempotent: a stamp file in the venv records the sha256 of requirements-trl.txt (and of this script);
# a second run with the same files does nothing. Delete the venv (or the stamp) to rebuild.
# Needs python3 (3.11 on these machines, which the local torch 2.13.0 CPU wheel is built for) and PyPI.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="${1:-$root/.venv-peer}"
req="$here/requirements-trl.txt"
python="${PYTHON:-python3}"

stamp="$venv/.peer-env-stamp"
want="$(cat "$req" "$here/setup_peer_env.sh" | sha256sum | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -x "$venv/bin/python" ]]; then
    echo "peer env up to date: $venv"
    exit 0
fi

if [[ ! -x "$venv/bin/python" ]]; then
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
rm -f "$stamp"
# torch first and alone: `pip install torch==2.13.0` takes the local CPU wheel on these machines;
# with torch already present, the torch==2.13.0 line below is satisfied and nothing else is fetched.
"${pip[@]}" install "torch==2.13.0"
"${pip[@]}" install -r "$req"
"$venv/bin/python" - <<'PY'
import importlib.metadata as md
import torch
for name in ("torch", "trl", "diffusers", "transformers", "accelerate", "peft"):
    print(f"{name}=={md.version(name)}")
from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline  # noqa: F401  (DDPO importable)
PY
"${pip[@]}" freeze > "$venv/pip-freeze.txt"
echo "$want" > "$stamp"
echo "peer env ready: $venv"
