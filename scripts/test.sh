#!/usr/bin/env bash
# The README's test command: the default suite (fast and end-to-end tests, the Slurm cluster test included).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m pytest -q -m "not slow" "$@"
