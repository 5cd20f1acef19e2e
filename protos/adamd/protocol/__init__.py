"""adamd's wire contract, shared by client and server (neither owns it).

- `frames`: the raw-chunk frame codec of the streaming RPCs and the dtypes that travel.
- `bulk`: the bulk-data channel's frames (pushes and pulls over a plain socket, tensor memory
  straight to and from the kernel), negotiated over gRPC.
- `hyper`: param-group options (lr, betas, ...) to and from the wire, torch.optim.Adam's defaults
  and which keys choose an implementation rather than the maths.
- `shared_files`: the byte layout of the same-host shared-memory files.
- `layout`: where each parameter of a model sharded over several servers lives, and the layout
  record every shard keeps (the client plans it; servers show it and snapshot export reads it).
- `errors`: `ProtocolError`, the one exception the codecs raise.

The message types themselves are generated from protos/adamd/v1/adamd.proto into `adamd.v1`.
"""

from .errors import ProtocolError

__all__ = ["ProtocolError"]
