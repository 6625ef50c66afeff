#!/usr/bin/env bash
# Install Fireside with its test dependencies into .venv (idempotent), check lint,
# formatting and types, then run the suite. Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh test  # compiles llama.cpp on first install (~10 min on 2 cores)

# Every check runs, so one run shows every problem; any failure fails the script
# before the (much longer) test run.
failed=()
.venv/bin/ruff check . || failed+=("ruff check")
.venv/bin/ruff format --check . || failed+=("ruff format --check (run: .venv/bin/ruff format .)")
.venv/bin/python -m mypy || failed+=("mypy")  # files and strictness: [tool.mypy] in pyproject.toml
if [ ${#failed[@]} -gt 0 ]; then
    printf 'failed: %s\n' "${failed[@]}" >&2
    exit 1
fi

status=0
.venv/bin/python -m pytest -q "$@" || status=$?
if [ "$status" -eq 5 ]; then
    # pytest's "no tests collected". A selection given here (-k, -m, a path) that
    # matches nothing is the caller's to judge; a whole run that finds none is broken.
    if [ $# -gt 0 ]; then
        echo "no tests matched: $*" >&2
        exit 0
    fi
    echo "no tests were collected" >&2
fi
exit "$status"
