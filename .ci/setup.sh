#!/usr/bin/env bash
# Creates .venv with a Python >= 3.12 and installs qjax (editable) with its test extra.
# Usage: bash .ci/setup.sh [extra,...]   (default extra: test)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test}"

find_python() {
  # Candidates in order of preference; pyenv installs are reached through PYENV_VERSION.
  local c v
  for c in "${QJAX_PYTHON:-}" python3.12 python3.13 python3; do
    [ -n "$c" ] || continue
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      echo "$c"; return 0
    fi
  done
  if command -v pyenv >/dev/null 2>&1; then
    for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.(1[2-9])(\.|$)' | sort -V); do
      if PYENV_VERSION="$v" python3 -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
        echo "pyenv:$v"; return 0
      fi
    done
  fi
  return 1
}

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
  if ! py="$(find_python)"; then
    echo "qjax setup: no Python >= 3.12 found (tried \$QJAX_PYTHON, python3.12, python3.13, python3 and pyenv)." >&2
    echo "Install one (e.g. 'pyenv install 3.12') or point QJAX_PYTHON at it, then rerun." >&2
    exit 1
  fi
  echo "qjax setup: creating .venv with: $py"
  rm -rf .venv
  case "$py" in
    pyenv:*) PYENV_VERSION="${py#pyenv:}" python3 -m venv .venv ;;
    *) "$py" -m venv .venv ;;
  esac
fi
stamp=".venv/.qjax-installed-$extras"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[$extras]"
  touch "$stamp"
fi
.venv/bin/python -c 'import jax, sys; print(f"qjax setup: python {sys.version.split()[0]}, jax {jax.__version__}")'
