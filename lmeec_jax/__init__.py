"""lmeec-jax: LM-EEC (SAM 2.1 + MV_MoE + compressed dual memory) in JAX / Flax NNX."""

__version__ = "0.1.0"
