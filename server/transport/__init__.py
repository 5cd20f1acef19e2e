"""The ways bytes reach the operations layer: gRPC (`grpc_service`, `grpc_server`,
`grpc_convert`), the bulk-data channel (`bulk`), same-host shared memory (`same_host`), and the
TLS settings they share (`tls`). A transport imports the operations layer, not another transport."""
