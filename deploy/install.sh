#!/bin/sh
# Install cxr-triage from this repository into a virtual environment, on a fresh Debian machine included
# (Debian's own Python refuses `pip install` outside one: PEP 668, "externally managed environment").
#
#   sh deploy/install.sh                  # .venv in the repository, PyTorch for this machine
#   sh deploy/install.sh --cpu            # PyTorch's CPU build even where there is a GPU
#   sh deploy/install.sh --extras postgres --venv /opt/cxr-triage
#   sh deploy/install.sh --dry-run        # print the commands instead of running them
#   sh deploy/install.sh --system-site-packages   # reuse a PyTorch already installed for the system's Python
#
# PyTorch: PyPI's torch wheel for Linux x86_64 is the CUDA build (about 5.7 GB installed). On a machine without
# an NVIDIA GPU (no `nvidia-smi` on the PATH) this script adds PyTorch's CPU wheel index,
# https://download.pytorch.org/whl/cpu, the one deploy/Containerfile uses: pip then takes torch and torchvision
# as their "+cpu" builds (about a fifth of the size; same results on the CPU). PIP_EXTRA_INDEX_URL and the other
# PIP_* variables are honoured as usual.
set -eu

here=$(cd "$(dirname "$0")/.." && pwd)
venv="$here/.venv"
flavour=auto
extras=""
run=""
venv_options=""
python=${PYTHON:-python3}
CPU_INDEX=https://download.pytorch.org/whl/cpu

while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) flavour=cpu ;;
        --cuda) flavour=cuda ;;
        --venv) venv=$2; shift ;;
        --extras) extras="[$2]"; shift ;;
        --dry-run) run=echo ;;
        --system-site-packages) venv_options=--system-site-packages ;;
        -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

if [ "$flavour" = auto ]; then
    if command -v nvidia-smi >/dev/null 2>&1; then flavour=cuda; else flavour=cpu; fi
fi
index=""
if [ "$flavour" = cpu ]; then
    index="--extra-index-url $CPU_INDEX"
    echo "install.sh: no NVIDIA GPU here (or --cpu): PyTorch's CPU build from $CPU_INDEX" >&2
else
    echo "install.sh: NVIDIA GPU (or --cuda): PyTorch's CUDA build from PyPI" >&2
fi

if [ -z "$run" ] && ! "$python" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    echo "install.sh: $python cannot create virtual environments; on Debian: sudo apt install python3-venv" >&2
    exit 1
fi
# shellcheck disable=SC2086  # $venv_options is one word or none
$run "$python" -m venv $venv_options "$venv"
# shellcheck disable=SC2086  # $index is two words or none
$run "$venv/bin/python" -m pip install $index -e "$here$extras"
echo "install.sh: done; run $venv/bin/cxr-triage (or activate: . $venv/bin/activate)" >&2
