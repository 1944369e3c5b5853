# Sourced by the project's scripts: makes sure the torch venv exists and points the
# build (torch-sys) and the tests at it. Usage: source scripts/env.sh
_clipcap_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CLIPCAP_VENV="$(bash "$_clipcap_root/scripts/venv.sh")" || return 1
export CLIPCAP_VENV
export CLIPCAP_PYTHON="$CLIPCAP_VENV/bin/python"
# torch-sys asks `python` (when VIRTUAL_ENV is set) where torch's headers and libraries are.
export VIRTUAL_ENV="$CLIPCAP_VENV"
export PATH="$CLIPCAP_VENV/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
