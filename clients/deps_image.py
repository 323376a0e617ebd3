"""Write the descriptors of the google.rpc error details and the gRPC health service, which the
generated TypeScript client needs beside stepserve's own proto, as a buf image
(a FileDescriptorSet), from the Python packages stepserve already installs
(googleapis-common-protos, grpcio-health-checking, protobuf): the same definitions the Python
server uses, with nothing fetched or vendored.

    python clients/deps_image.py OUT.binpb    # then: buf generate OUT.binpb --template ...
"""

from __future__ import annotations

import sys
from pathlib import Path

from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FileDescriptor
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2


def image(files: list[FileDescriptor]) -> descriptor_pb2.FileDescriptorSet:
    """``files`` and everything they import, each once, dependencies first."""
    out = descriptor_pb2.FileDescriptorSet()
    seen: set[str] = set()

    def add(fd: FileDescriptor) -> None:
        if fd.name in seen:
            return
        seen.add(fd.name)
        for dep in fd.dependencies:
            add(dep)
        proto = out.file.add()
        fd.CopyToProto(proto)

    for f in files:
        add(f)
    return out


def main() -> int:
    files = [status_pb2.DESCRIPTOR, error_details_pb2.DESCRIPTOR, health_pb2.DESCRIPTOR]
    Path(sys.argv[1]).write_bytes(image(files).SerializeToString())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
