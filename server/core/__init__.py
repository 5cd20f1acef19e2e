"""The optimizer core: models by name, their parameters and torch.optim.Adam, pushes, sync rounds,
param-group edits, the torch state-dict format, staging buffers and limits. No networking: nothing
here imports a transport, the HTTP side or the command line, and no `adamd.v1` message crosses in
or out."""
