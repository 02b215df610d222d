# Sourced by the scripts. install_venv DIR EXTRAS: create the virtual environment DIR if
# missing and install dpflow (editable) with EXTRAS into it; re-installs only when
# pyproject.toml changed since the last install. Needs only Python 3.11+ on the machine.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"

install_venv() {
    local venv="$1" extras="$2"
    if [ ! -x "$venv/bin/python" ]; then
        echo "setup: creating $venv" >&2
        "$PYTHON" -m venv "$venv"
    fi
    local stamp="$venv/.dpflow-installed"
    if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
        echo "setup: installing dpflow-mpi[$extras] (the dpflow package) into $venv" >&2
        # Before its distribution was renamed dpflow-mpi, this checkout installed as "dpflow"
        # (an unrelated project's name on the package index): remove that record first.
        if "$venv/bin/python" -m pip show --quiet dpflow >/dev/null 2>&1; then
            "$venv/bin/python" -m pip uninstall --quiet --yes dpflow
        fi
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT[$extras]"
        touch "$stamp"
    fi
}
