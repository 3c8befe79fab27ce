#!/usr/bin/env bash
# Installs the Debian packages a target needs, only those missing.
#   tools/system-deps.sh engine   python3-venv (to create the engine environment)
#   tools/system-deps.sh qgis     QGIS 3.22 LTR with its Python bindings (plugin tests)
set -euo pipefail
want=()
case "${1:-engine}" in
  engine) python3 -c "import ensurepip, venv" 2>/dev/null || want+=(python3-venv) ;;
  qgis)
    /usr/bin/python3 -c "import qgis.core" 2>/dev/null || want+=(python3-qgis qgis)
    /usr/bin/python3 -c "import ensurepip, venv" 2>/dev/null || want+=(python3-venv)
    command -v qgis_process >/dev/null || want+=(qgis)
    ;;
  *) echo "usage: $0 engine|qgis" >&2; exit 2 ;;
esac
[ ${#want[@]} -eq 0 ] && exit 0
sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing Debian packages: ${want[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null
