"""The protocol's one exception: something that cannot be encoded, or bytes that do not decode.

Neither side lets it escape: the server answers it as INVALID_ARGUMENT, the client raises its own
`InvalidArgument` (bad input it was given) or `AdamdError` (a reply it cannot read).
"""

from __future__ import annotations


class ProtocolError(ValueError):
    """A tensor or value that cannot travel, or a frame, chunk or value that does not decode."""
