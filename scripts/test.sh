#!/usr/bin/env bash
# The test command of the README (and of .ci/run): builds the environment if needed, runs the suite.
set -euo pipefail
export CAUSVID_WITH_BROWSER=1  # the browser tests need Debian's chromium; the demo does not
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$CAUSVID_ROOT"
exec "$CAUSVID_PY" -m pytest -q tests "$@"
