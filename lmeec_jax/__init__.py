"""lmeec-jax: LM-EEC (SAM 2.1 + MV_MoE + compressed dual memory) in JAX / Flax NNX.

``from lmeec_jax import Predictor`` is the tracker's public entry point
(:mod:`lmeec_jax.inference.predictor`).
"""

__version__ = "0.1.0"

__all__ = ["Predictor", "TrackFrame", "__version__"]


def __getattr__(name):  # lazy: importing the package does not import jax
    if name in ("Predictor", "TrackFrame"):
        from lmeec_jax.inference import predictor

        return getattr(predictor, name)
    raise AttributeError(f"module 'lmeec_jax' has no attribute {name!r}")
