#!/bin/sh
# Install cxr-triage from this repository into a virtual environment, on a fresh Debian machine included
# (Debian's own Python refuses `pip install` outside one: PEP 668, "externally managed environment").
#
#   sh deploy/install.sh                  # .venv in the repository, PyTorch for this machine
#   sh deploy/install.sh --cpu            # PyTorch's CPU build even where there is a GPU
#   sh deploy/install.sh --cuda           # PyPI's CUDA build even where there is no GPU
#   sh deploy/install.sh --extras postgres --venv /opt/cxr-triage
#   sh deploy/install.sh --dry-run        # print the commands instead of running them
#   sh deploy/install.sh --system-site-packages   # reuse a PyTorch already installed for the system's Python
#   sh deploy/install.sh --wheels DIR     # offline: install only from the wheels in DIR (no index at all)
#
# PyTorch: PyPI's torch wheel for Linux x86_64 is the CUDA build (several GB installed with its nvidia-* wheels).
# Without an NVIDIA GPU (no `nvidia-smi` on the PATH) or with --cpu, torch and torchvision alone are installed
# first from PyTorch's CPU wheel index, https://download.pytorch.org/whl/cpu (PyPI for their dependencies), with a
# 5 s connection timeout and no retries; everything else then comes from your usual index. When that index cannot
# be reached (a hospital proxy, no DNS), one line says so and PyPI's CUDA build is installed instead. At the end
# the script reports the torch it installed (version, CUDA or CPU build) and the venv's size.
# CXR_TRIAGE_TORCH_INDEX overrides the CPU index URL (a mirror); PIP_INDEX_URL and the other PIP_* variables
# are honoured as usual.
#
# Offline (air-gapped host): build the wheel folder on a connected Linux x86_64 machine with the same Python
# (3.11) and CPU architecture, from this repository's root:
#
#   pip download -d wheels --index-url https://download.pytorch.org/whl/cpu \
#       --extra-index-url https://pypi.org/simple torch torchvision
#   pip wheel -w wheels --find-links wheels '.[postgres]'    # this package and everything else
#
# (pip keeps the "+cpu" torch already in wheels/: a local version sorts above the same release on PyPI; check
# with `ls wheels/torch-*`), copy wheels/ and this repository over, then: sh deploy/install.sh --wheels wheels
set -eu

here=$(cd "$(dirname "$0")/.." && pwd)
venv="$here/.venv"
flavour=auto
extras=""
run=""
venv_options=""
wheels=""
python=${PYTHON:-python3}
CPU_INDEX=${CXR_TRIAGE_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}
PYPI=${PIP_INDEX_URL:-https://pypi.org/simple}
# The cost of the fallback, measured (README.md, "Quick start"): PyPI's CUDA build with its nvidia-* wheels.
CUDA_COST="about 5.7 GiB in the venv, 4.0 GiB of it CUDA libraries that a CPU-only host never uses"

usage() { sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) flavour=cpu ;;
        --cuda) flavour=cuda ;;
        --venv) [ $# -ge 2 ] || { echo "install.sh: --venv needs a folder" >&2; exit 2; }; venv=$2; shift ;;
        --extras) [ $# -ge 2 ] || { echo "install.sh: --extras needs a name" >&2; exit 2; }; extras="[$2]"; shift ;;
        --wheels) [ $# -ge 2 ] || { echo "install.sh: --wheels needs a folder" >&2; exit 2; }; wheels=$2; shift ;;
        --dry-run) run=echo ;;
        --system-site-packages) venv_options=--system-site-packages ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

wheel=""
if [ -n "$wheels" ]; then
    if [ ! -d "$wheels" ]; then
        echo "install.sh: --wheels $wheels: no such folder (build it on a connected machine: see --help)" >&2
        exit 1
    fi
    wheels=$(cd "$wheels" && pwd)
    for candidate in "$wheels"/cxr_triage-*.whl; do
        [ -f "$candidate" ] && wheel=$candidate
    done
    if [ -z "$wheel" ]; then
        echo "install.sh: $wheels holds no cxr_triage-*.whl: build the folder with pip wheel (see --help)" >&2
        exit 1
    fi
fi

if [ -z "$run" ] && ! "$python" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    echo "install.sh: $python cannot create virtual environments; on Debian: sudo apt install python3-venv" >&2
    exit 1
fi
# shellcheck disable=SC2086  # $venv_options is one word or none
$run "$python" -m venv $venv_options "$venv"

if [ -n "$wheels" ]; then
    echo "install.sh: offline, only from $wheels (no index)" >&2
    if ! $run "$venv/bin/python" -m pip install --no-index --find-links "$wheels" "$wheel$extras"; then
        echo "install.sh: $wheels lacks a wheel that pip needs (its ERROR above names it); rebuild the folder" \
            "as --help says" >&2
        exit 1
    fi
else
    if [ "$flavour" = auto ]; then
        if command -v nvidia-smi >/dev/null 2>&1; then flavour=cuda; else flavour=cpu; fi
    fi
    if [ "$flavour" = cpu ]; then
        # One probe of the index (5 s at most), so that an unreachable one costs one line, not pip's retries.
        probe='import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1], timeout=5).close()
except Exception as error:
    print(getattr(error, "reason", None) or error)
    sys.exit(1)'
        unreachable=""
        if [ -z "$run" ] && ! reason=$("$venv/bin/python" -c "$probe" "${CPU_INDEX%/}/torch/" 2>&1); then
            unreachable=${reason:-no answer}
        fi
        if [ -n "$unreachable" ]; then
            echo "install.sh: PyTorch's CPU index $CPU_INDEX cannot be reached ($unreachable): installing PyPI's" \
                "CUDA build of torch instead ($CUDA_COST); for the CPU build offline see --wheels" >&2
        else
            echo "install.sh: no NVIDIA GPU here (or --cpu): torch and torchvision from $CPU_INDEX (CPU build)" >&2
            if ! $run "$venv/bin/python" -m pip install --timeout 5 --retries 0 --index-url "$CPU_INDEX" \
                    --extra-index-url "$PYPI" torch torchvision; then
                echo "install.sh: torch from $CPU_INDEX failed (pip's message above): installing PyPI's CUDA" \
                    "build instead ($CUDA_COST)" >&2
            fi
        fi
    else
        echo "install.sh: NVIDIA GPU (or --cuda): PyTorch's CUDA build from PyPI" >&2
    fi
    $run "$venv/bin/python" -m pip install -e "$here$extras"
fi

if [ -n "$run" ]; then
    echo "install.sh: dry run; nothing installed" >&2
    exit 0
fi
# What was actually installed, read from the new venv (not what was asked for).
installed=$("$venv/bin/python" -c 'import os, sys, torch
build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU build"
where = "" if os.path.realpath(torch.__file__).startswith(os.path.realpath(sys.prefix) + os.sep) else (
    f", from {os.path.dirname(os.path.dirname(torch.__file__))}, not counted below")
print(f"torch {torch.__version__} ({build}{where})")' 2>/dev/null) ||
    installed="no importable torch (see: $venv/bin/python -c 'import torch')"
size=$(du -sh "$venv" | cut -f1)
echo "install.sh: installed $installed; $venv takes $size" >&2
echo "install.sh: done; run $venv/bin/cxr-triage (or activate: . $venv/bin/activate)" >&2
