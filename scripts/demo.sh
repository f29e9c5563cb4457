#!/usr/bin/env bash
# The main command of the README. Until the built-in model is trained (issue 6) it runs the real
# Wan2.1 / CausVid / Self-Forcing parity check on the shared vectors: the causal DiT, its KV cache
# and the few-step rollout reproducing the reference implementations' numbers.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$CAUSVID_ROOT"
parity="${CAUSVID_PARITY:-$CAUSVID_ROOT/../shared/parity/wan-tiny-seed0.json}"
exec causvid parity "$parity" "$@"
