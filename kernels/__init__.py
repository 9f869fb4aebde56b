"""bitscale.kernels: arbitrary-precision matmul in the bipolar-INT format."""

__all__: list[str] = []
