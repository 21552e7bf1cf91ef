"""Prints the wire shape of package ``inference`` as JSON: ours or tritonclient's.

Run as a script (``python describe_protocol.py ours|tritonclient``): both define
the protobuf package ``inference``, which cannot be loaded twice in one process.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from google.protobuf.descriptor import (
    Descriptor,
    EnumDescriptor,
    FieldDescriptor,
    FileDescriptor,
)

_TYPE_NAMES = {
    value: name for name, value in vars(FieldDescriptor).items() if name.startswith("TYPE_")
}


def describe_field(field: FieldDescriptor) -> dict[str, Any]:
    shape: dict[str, Any] = {
        "name": field.name,
        "type": _TYPE_NAMES[field.type],
        "repeated": field.is_repeated,
        "oneof": field.containing_oneof.name if field.containing_oneof else None,
    }
    message = field.message_type
    if message is not None and message.GetOptions().map_entry:
        key, value = message.fields_by_name["key"], message.fields_by_name["value"]
        target = value.message_type or value.enum_type
        shape["map"] = [_TYPE_NAMES[key.type], _TYPE_NAMES[value.type], target and target.full_name]
    elif message is not None:
        shape["type_name"] = message.full_name
    elif field.enum_type is not None:
        shape["type_name"] = field.enum_type.full_name
    return shape


def describe(files: list[FileDescriptor]) -> dict[str, Any]:
    shape: dict[str, Any] = {"messages": {}, "enums": {}, "services": {}}

    def add_enum(enum: EnumDescriptor) -> None:
        shape["enums"][enum.full_name] = {v.name: v.number for v in enum.values}

    def add_message(message: Descriptor) -> None:
        if message.GetOptions().map_entry:
            return
        shape["messages"][message.full_name] = {
            str(f.number): describe_field(f) for f in message.fields
        }
        for enum in message.enum_types:
            add_enum(enum)
        for nested in message.nested_types:
            add_message(nested)

    for file in files:
        for message in file.message_types_by_name.values():
            add_message(message)
        for enum in file.enum_types_by_name.values():
            add_enum(enum)
        for service in file.services_by_name.values():
            shape["services"][service.full_name] = {
                m.name: [
                    m.input_type.full_name,
                    m.output_type.full_name,
                    m.client_streaming,
                    m.server_streaming,
                ]
                for m in service.methods
            }
    return shape


def main() -> None:
    if sys.argv[1] == "ours":
        from conveyor.oip.v2 import grpc_service_pb2, model_config_pb2
    else:
        from tritonclient.grpc import model_config_pb2
        from tritonclient.grpc import service_pb2 as grpc_service_pb2
    json.dump(describe([grpc_service_pb2.DESCRIPTOR, model_config_pb2.DESCRIPTOR]), sys.stdout)


if __name__ == "__main__":
    main()
