"""bitscale.checkpoint: lazy asynchronous checkpoints in a universal format."""

__all__: list[str] = []
