#!/usr/bin/env bash
# On a GPU machine of the device tool (its image's python3 3.12 with torch; nothing can be
# fetched there): install the wheels `make gpu-wheels` put in .whl (the call carries it) into
# /tmp/site, point Python at them and at this checkout's sources, then run the command.
# From the repository root:
#   bash files/serving/bench/on_gpu.sh COMMIT python3 -m metalserve bench serve --device cuda ...
# COMMIT is recorded as the reports' environment.git_commit (the copy there has no .git).
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 COMMIT COMMAND..." >&2; exit 2; }
commit=$1
shift
compgen -G '.whl/*.whl' > /dev/null || { echo "no .whl/*.whl: run make gpu-wheels, carry .whl" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/files/serving/src
# The image sets PYTHONDONTWRITEBYTECODE=1 and ships its packages without bytecode, so every
# process compiled torch's and transformers' sources again (transformers' import 7.2 s, 3.6-4.3 s
# from bytecode; round 2 step 16): a start measured so is not a host's, where pip and Debian
# install the bytecode. Compile it once, under a prefix (the image stays as it is).
unset PYTHONDONTWRITEBYTECODE
export PYTHONPYCACHEPREFIX=/tmp/pycache
python3 -m compileall -q -j 0 \
  $(python3 -c 'import importlib.util as u; print(*(u.find_spec(p).submodule_search_locations[0] for p in ("torch", "transformers")))') \
  /tmp/site "$PWD/files/serving/src" > /dev/null || true
export METALSERVE_GIT_COMMIT=$commit
# Inductor's cache outlives one command on a warm machine (a later run then compiles nothing).
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor-cache}
# One Triton cache for our kernels and Inductor's, as the replica's unit sets it (round 2 step 26).
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$TORCHINDUCTOR_CACHE_DIR/triton}
exec "$@"
