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

# run_mpi_tests TIMEOUT N LAUNCHER... -- PYTEST_ARGS...: the MPI-marked tests on N ranks of
# LAUNCHER (mpiexec or mpirun ...), every rank logging to its own file. Passes only if the
# launcher succeeds AND every rank's pytest summary shows no failure: a launcher's status
# alone is not enough (Open MPI 5's mpirun has returned 0 after losing ranks). Rank 0's
# summary is shown; every log on failure.
run_mpi_tests() {
    local timeout_s="$1" n="$2" launcher=() log_dir last r status=0
    shift 2
    while [ "$1" != "--" ]; do launcher+=("$1"); shift; done
    shift
    log_dir="$(mktemp -d)"
    if ! timeout -k 10 "$timeout_s" "${launcher[@]}" -n "$n" \
        bash -c 'exec python -m pytest -q --with-mpi -m mpi -p no:cacheprovider "$@" > "'"$log_dir"'/rank${PMI_RANK:-${OMPI_COMM_WORLD_RANK:-0}}.log" 2>&1' _ "$@"; then
        echo "FAILED: the launcher ended with an error" >&2
        status=1
    fi
    for ((r = 0; r < n; r++)); do
        last="$(tail -n 1 "$log_dir/rank$r.log" 2>/dev/null || true)"
        if ! [[ "$last" =~ (passed|skipped) ]] || [[ "$last" =~ (failed|error) ]]; then
            echo "FAILED: rank $r of $n ended with: ${last:-no log}" >&2
            status=1
        fi
    done
    if [ "$status" -eq 0 ]; then
        tail -n 1 "$log_dir/rank0.log"
    else
        for f in "$log_dir"/rank*.log; do echo "-- $f"; cat "$f"; done
    fi
    rm -rf "$log_dir"
    return "$status"
}
