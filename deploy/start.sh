#!/usr/bin/env bash
# Starts the cubeserve HTTP server from environment variables (systemd: EnvironmentFile=,
# see cubeserve.service and cubeserve.env). Extra arguments are passed on to the server.
#
# CUBESERVE_API_KEY is read by the server itself, so the key never appears on a command line
# (where `ps` would show it to every user).
set -euo pipefail

python="${CUBESERVE_PYTHON:-python3}"
args=(--host "${CUBESERVE_HOST:-0.0.0.0}" --port "${CUBESERVE_PORT:-8000}")
if [[ -n "${CUBESERVE_MODEL_PATH:-}" ]]; then
  args+=(--model-path "${CUBESERVE_MODEL_PATH}")
fi
if [[ -n "${CUBESERVE_SERVED_MODEL_NAME:-}" ]]; then
  args+=(--served-model-name "${CUBESERVE_SERVED_MODEL_NAME}")
fi
# Any other launch_server flags, split on whitespace, e.g. "--mem-fraction-static 0.85".
read -r -a extra <<< "${CUBESERVE_EXTRA_ARGS:-}"

# exec: the server becomes the unit's main process and receives systemd's SIGTERM directly.
exec "${python}" -m cubeserve.launch_server "${args[@]}" "${extra[@]}" "$@"
