"""Generates extproc/_gen/ from protos/: run by ``make protos``; the output is never edited by hand.

The Envoy messages our services use ship in xds-protos as compiled Python only (no .proto
sources), so protoc reads their descriptors from a descriptor set built here from the installed
modules, and the generated code imports those same modules at run time.
"""

from __future__ import annotations

import importlib
import re
import shutil
import sys
import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FileDescriptor
from grpc_tools import protoc  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "extproc" / "_gen"
PACKAGE = "extproc._gen"
# Modules whose descriptors (with everything they import) protoc needs to parse our files.
DEPENDENCIES = ("envoy.service.ratelimit.v3.rls_pb2",)


def descriptor_set(modules: tuple[str, ...]) -> bytes:
    """A FileDescriptorSet of ``modules`` and their transitive imports, dependencies first."""
    files = descriptor_pb2.FileDescriptorSet()
    seen: set[str] = set()

    def add(descriptor: FileDescriptor) -> None:
        if descriptor.name in seen:
            return
        seen.add(descriptor.name)
        for dependency in descriptor.dependencies:
            add(dependency)
        files.file.append(descriptor_pb2.FileDescriptorProto.FromString(descriptor.serialized_pb))

    for name in modules:
        add(importlib.import_module(name).DESCRIPTOR)
    return files.SerializeToString()


def main() -> int:
    sources = sorted(p.relative_to(PROTOS).as_posix() for p in PROTOS.rglob("*.proto"))
    top_packages = sorted({source.split("/")[0] for source in sources})
    with tempfile.TemporaryDirectory(prefix="maas-protos-") as tmp:
        deps = Path(tmp) / "deps.binpb"
        deps.write_bytes(descriptor_set(DEPENDENCIES))
        staged = Path(tmp) / "out"
        staged.mkdir()
        code = protoc.main(
            [
                "grpc_tools.protoc",
                f"--descriptor_set_in={deps}",
                f"--proto_path={PROTOS}",
                f"--python_out={staged}",
                f"--pyi_out={staged}",
                f"--grpc_python_out={staged}",
                *sources,
            ]
        )
        if code != 0:
            print(f"protoc failed with exit code {code}", file=sys.stderr)
            return int(code)
        # Our own generated packages live under extproc._gen; Envoy's stay where xds-protos has them.
        own = re.compile(
            r"^(from|import) (" + "|".join(map(re.escape, top_packages)) + r")\b", re.M
        )
        for path in staged.rglob("*.py*"):
            path.write_text(own.sub(rf"\1 {PACKAGE}.\2", path.read_text()))
        for folder in [staged, *(p for p in staged.rglob("*") if p.is_dir())]:
            (folder / "__init__.py").touch()
        (staged / "__init__.py").write_text(
            '"""Code generated from protos/ by protos/generate.py (make protos). Do not edit."""\n'
        )
        if OUT.exists():
            shutil.rmtree(OUT)
        shutil.copytree(staged, OUT)
    print(f"generated {', '.join(sources)} into {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
