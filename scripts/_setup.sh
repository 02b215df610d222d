# Sourced by the scripts: create .venv if missing, install dpflow with MPICH and the test
# and plot tools, and put .venv/bin first on PATH.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
VENV="${DPFLOW_VENV:-$ROOT/.venv}"
install_venv "$VENV" "mpich,test,plot"
export PATH="$VENV/bin:$PATH"
