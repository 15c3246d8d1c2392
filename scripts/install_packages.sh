#!/bin/sh
# Install the service's Python packages into the active virtual environment (image build).
#   install_packages.sh serve   what the serving processes import: requirements-serve.txt (no torch)
#   install_packages.sh all     requirements.txt: also torch and sentence-transformers, for the export
#                               and the torch engine
# torch is installed first and on its own, the CPU build from wheels/ or $TORCH_INDEX_URL, so that
# `torch==2.13.0` in requirements.txt is already satisfied by it and no CUDA build is ever pulled in.
set -eu
case "${1:-}" in
    serve)
        pip install --find-links wheels -r requirements-serve.txt
        ;;
    all)
        if [ -z "${TORCH_INDEX_URL:-}" ] && ! ls wheels/torch-2.13.0*.whl >/dev/null 2>&1; then
            echo "TORCH_INDEX_URL is empty and wheels/ holds no torch 2.13.0 wheel" >&2
            exit 1
        fi
        PIP_EXTRA_INDEX_URL="${TORCH_INDEX_URL:-}" pip install --find-links wheels torch==2.13.0
        python -c "import torch, sys; sys.exit('torch is a CUDA build' if torch.version.cuda else 0)"
        pip install --find-links wheels -r requirements.txt
        ;;
    *)
        echo "usage: $0 serve|all" >&2
        exit 2
        ;;
esac
