# Sourced by scripts/test and scripts/demo: make .venv and a redis-server ready.
# Safe to run again: it only does what is missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "kitebus: creating .venv with $($PYTHON --version)" >&2
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.kitebus-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ] \
    || [ kitewire/_speedups.c -nt "$stamp" ] || [ consumers/_speedups.c -nt "$stamp" ]; then
    # Builds the C speed-ups where a compiler is present; without one pip only warns and the
    # pure-Python encoder and payload decoder run (same output).
    echo "kitebus: installing the project and its test extras into .venv" >&2
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
    touch "$stamp"
fi

if ! command -v redis-server >/dev/null 2>&1; then
    echo "kitebus: redis-server is missing; installing Debian's package" >&2
    if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
    # Debian starts a system-wide service on 6379; kitebus never needs it.
fi
