#!/usr/bin/env bash
# Wheels for the GPU machine's image (Python 3.12, no internet there), into the git-ignored
# .whl/ that device calls carry (carry: [".whl"]): the engine's msgspec, the server's stack
# for the P5 stage, pytest-xdist for the suite's parallel test groups, and the transformers
# CI tests against (the image's 5.17 gives wrong references for two model families; the
# suite puts this one in front for the tests only). Versions are pinned to this machine's (a
# set known to work together, e.g. pydantic with its pydantic_core).
set -euo pipefail
cd "$(dirname "$0")/.."
PKGS="msgspec pyzmq pydantic pydantic_core fastapi starlette uvicorn annotated_types
  annotated_doc typing_extensions typing_inspection prometheus_client h11 uvloop click anyio sniffio
  httpx httpcore certifi idna opentelemetry-api pytest-xdist execnet transformers"
PINS=$(python - $PKGS <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version
for name in sys.argv[1:]:
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        print(name)
PY
)
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
  -d .whl $PINS
ls .whl
