"""A module's forward pass as one compiled program. Called eagerly, each of its operations compiles on its own, which
takes several times as long as compiling the whole pass and dominates a test that calls a model once or twice."""

from flax import nnx


@nnx.jit
def forward(module: nnx.Module, *args, **kwargs):
    """`module(*args, **kwargs)`, jitted (array arguments only)."""
    return module(*args, **kwargs)
