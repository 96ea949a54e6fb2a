#!/usr/bin/env bash
# Start a local Ray head with the dashboard (the Jobs API that `maskdiet jobs` and `maskdiet schedule` use).
#   infra/local/start-ray-head.sh            # background; stop with `ray stop`
#   infra/local/start-ray-head.sh --block    # foreground; Ctrl-C stops it
# Ports and CPUs come from the environment: RAY_PORT (6379), DASHBOARD_PORT (8265), NUM_CPUS (all cores).
# Ray 2.60 turns token auth on when ~/.ray/auth_token exists (as after `ray get-auth-token --generate`);
# maskdiet reads the token from there (or RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH) and never prints it.
set -euo pipefail

RAY_PORT="${RAY_PORT:-6379}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
args=(
  --head
  --node-ip-address=127.0.0.1
  --port="${RAY_PORT}"
  --include-dashboard=true
  --dashboard-host=127.0.0.1
  --dashboard-port="${DASHBOARD_PORT}"
  --disable-usage-stats
)
if [[ -n "${NUM_CPUS:-}" ]]; then
  args+=(--num-cpus="${NUM_CPUS}")
fi

echo "Jobs API: http://127.0.0.1:${DASHBOARD_PORT}"
echo "  export RAY_API_SERVER_ADDRESS=http://127.0.0.1:${DASHBOARD_PORT}"
echo "  maskdiet jobs submit -- maskdiet run"
exec ray start "${args[@]}" "$@"
