"""The ways bytes reach the data plane and the operations layer: gRPC (`grpc_service`,
`grpc_server`), the bulk-data channel (`bulk`), same-host shared memory (`same_host`), and what
they share: the adamd.v1 <-> core conversions (`messages`) and the TLS settings (`tls`). A
transport imports the layers below it, never another transport."""
