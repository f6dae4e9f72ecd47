"""Regenerate the committed protobuf/gRPC modules from scistream.proto.

    .venv/bin/pip install grpcio-tools grpclib mypy-protobuf
    .venv/bin/python daemon/relayd/components/stream/proto/generate.py

Writes scistream_pb2.py (messages) with its type stub scistream_pb2.pyi (mypy-protobuf) and
scistream_grpc.py (grpclib service base and stub, used by relayd) here, and
tests/scistream_pb2_grpc.py (the grpcio stub: the stack s2uc uses; the tests talk to relayd
through it, and grpcio is a test dependency only). Generated imports are rewritten so the
modules find scistream_pb2 inside relayd.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

from grpc_tools import protoc

HERE = Path(__file__).resolve().parent
TESTS = HERE.parents[4] / "tests"  # daemon/relayd/components/stream/proto -> the repository's tests/


def main() -> int:
    plugin = shutil.which("protoc-gen-grpclib_python", path=str(Path(sys.executable).parent))
    if plugin is None:
        print("protoc-gen-grpclib_python not found: pip install grpclib", file=sys.stderr)
        return 1
    mypy_plugin = shutil.which("protoc-gen-mypy", path=str(Path(sys.executable).parent))
    if mypy_plugin is None:
        print("protoc-gen-mypy not found: pip install mypy-protobuf", file=sys.stderr)
        return 1
    args = [
        "protoc",
        f"-I{HERE}",
        f"--plugin=protoc-gen-grpclib_python={plugin}",
        f"--python_out={HERE}",
        f"--grpclib_python_out={HERE}",
        f"--plugin=protoc-gen-mypy={mypy_plugin}",
        f"--mypy_out={HERE}",
        f"--grpc_python_out={TESTS}",
        str(HERE / "scistream.proto"),
    ]
    if protoc.main(args) != 0:
        return 1
    for path, package in ((HERE / "scistream_grpc.py", "."),
                          (TESTS / "scistream_pb2_grpc.py", "relayd.components.stream.proto")):
        text = path.read_text()
        text = re.sub(r"^import scistream_pb2\b", f"from {package} import scistream_pb2", text, flags=re.M)
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
