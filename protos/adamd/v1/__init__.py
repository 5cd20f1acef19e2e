"""Generated protobuf and gRPC modules for the adamd.v1 wire protocol (see adamd.proto)."""
