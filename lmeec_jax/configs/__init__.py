"""Named training configs, shipped as package data: ``<name>.yaml`` is ``python -m train --config <name>``
(see :mod:`lmeec_jax.training.config`)."""
