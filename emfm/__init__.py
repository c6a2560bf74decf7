"""emfm: self-supervised foundation models for cellular electron microscopy (JAX / Flax NNX)."""

__version__ = "0.1.0"
