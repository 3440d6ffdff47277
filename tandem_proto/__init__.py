"""Generated protobuf / gRPC code for `proto/` (do not edit: run scripts/gen_proto.py)."""
