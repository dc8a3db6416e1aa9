"""Model weights: layouts (names, shapes, offsets) and safetensors I/O."""

from evomerge.weights.io import load_flat, save_flat
from evomerge.weights.layout import Layout

__all__ = ["Layout", "load_flat", "save_flat"]
