"""Every message, field, enum, enum value, service and rpc in proto/ carries a comment."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from google.protobuf import descriptor_pb2

REPO = Path(__file__).resolve().parents[2]

# SourceCodeInfo paths: field numbers in FileDescriptorProto / DescriptorProto / ... .
_MESSAGE, _ENUM, _SERVICE = 4, 5, 6
_FIELD, _NESTED, _NESTED_ENUM, _ONEOF = 2, 3, 4, 8
_ENUM_VALUE, _METHOD = 2, 2


def _descriptor_set(tmp_path: Path) -> descriptor_pb2.FileDescriptorSet:
    out = tmp_path / "set.pb"
    root = REPO / "proto"
    protos = [str(p.relative_to(root)) for p in root.glob("tandem/v1/*.proto")]
    assert protos
    # protoc runs in a subprocess: loading grpc_tools' bundled libprotobuf into the test
    # process makes a later import of NIXL's native module abort (seen with nixl-cu12 1.5.1)
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{REPO / 'proto'}",
                    "--include_source_info", f"--descriptor_set_out={out}", *protos],
                   check=True, cwd=REPO)
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def _enum_paths(prefix: tuple[int, ...], enum: descriptor_pb2.EnumDescriptorProto,
                name: str) -> dict[tuple[int, ...], str]:
    paths = {prefix: name}
    for i, value in enumerate(enum.value):
        paths[(*prefix, _ENUM_VALUE, i)] = f"{name}.{value.name}"
    return paths


def _message_paths(prefix: tuple[int, ...], msg: descriptor_pb2.DescriptorProto,
                   name: str) -> dict[tuple[int, ...], str]:
    paths = {prefix: name}
    for i, field in enumerate(msg.field):
        paths[(*prefix, _FIELD, i)] = f"{name}.{field.name}"
    for i, oneof in enumerate(msg.oneof_decl):
        if not oneof.name.startswith("_"):  # synthetic oneofs of proto3 `optional`
            paths[(*prefix, _ONEOF, i)] = f"{name}.{oneof.name}"
    for i, nested in enumerate(msg.nested_type):
        if nested.options.map_entry:  # synthesized for a map<> field, documented there
            continue
        paths.update(_message_paths((*prefix, _NESTED, i), nested, f"{name}.{nested.name}"))
    for i, enum in enumerate(msg.enum_type):
        paths.update(_enum_paths((*prefix, _NESTED_ENUM, i), enum, f"{name}.{enum.name}"))
    return paths


def test_every_element_has_a_comment(tmp_path: Path) -> None:
    missing: list[str] = []
    checked = 0
    for file in _descriptor_set(tmp_path).file:
        assert file.package == "tandem.v1"
        wanted: dict[tuple[int, ...], str] = {}
        for i, msg in enumerate(file.message_type):
            wanted.update(_message_paths((_MESSAGE, i), msg, msg.name))
        for i, enum in enumerate(file.enum_type):
            wanted.update(_enum_paths((_ENUM, i), enum, enum.name))
        for i, service in enumerate(file.service):
            wanted[(_SERVICE, i)] = service.name
            for j, method in enumerate(service.method):
                wanted[(_SERVICE, i, _METHOD, j)] = f"{service.name}.{method.name}"
        comments = {tuple(loc.path): loc.leading_comments.strip()
                    for loc in file.source_code_info.location}
        missing += [f"{file.name}: {name}" for path, name in wanted.items()
                    if not comments.get(path)]
        checked += len(wanted)
    assert checked > 100
    assert not missing, f"undocumented proto elements: {missing}"
