"""bitscale.hdp: hybrid data parallelism with dynamic context parallelism (ByteScale)."""

__all__: list[str] = []
