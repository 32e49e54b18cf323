"""`python -m convert`: SAM 2.1 / LM-EEC PyTorch checkpoints -> lmeec-jax model directories."""
