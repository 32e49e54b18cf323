"""Training: config (YAML + overrides), the train step and loop, validation.

``python -m train`` (see ``train/__main__.py``) is the command line; the pieces:
:mod:`.config`, :mod:`.trainer`, :mod:`.evaluate`, the forward pass
:mod:`lmeec_jax.training.forward`, the input pipeline :mod:`lmeec_jax.data.pipeline` and
checkpoints :mod:`lmeec_jax.training.checkpointing`.
"""
