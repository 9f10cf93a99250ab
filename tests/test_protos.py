"""The committed generated code matches protos/ (run scripts/regen-protos.sh if not)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GENERATED = ["otpgate_pb2.py", "otpgate_pb2.pyi", "otpgate_pb2_grpc.py", "otpgate_pb2_grpc.pyi"]


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{REPO / 'protos'}",
         f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}",
         f"--mypy_out={tmp_path}", f"--mypy_grpc_out={tmp_path}",
         str(REPO / "protos/otpgate/v1/otpgate.proto")],
        check=True, capture_output=True,
        # protoc finds the mypy plugins (protoc-gen-mypy) beside this Python.
        env=dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"),
    )  # fmt: skip
    for name in GENERATED:
        fresh = (tmp_path / "otpgate/v1" / name).read_text()
        committed = (REPO / "daemon/otpgate/v1" / name).read_text()
        assert fresh == committed, f"{name} is stale: run scripts/regen-protos.sh"
