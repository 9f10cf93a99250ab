#!/bin/sh
# Regenerates the committed Python code for protos/ (tests fail when it is stale).
# Needs grpcio-tools and mypy-protobuf (pip install -e '.[dev]').
set -eu
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
"$python" -m grpc_tools.protoc -Iprotos \
  --python_out=daemon --grpc_python_out=daemon --mypy_out=daemon --mypy_grpc_out=daemon \
  protos/otpgate/v1/otpgate.proto
