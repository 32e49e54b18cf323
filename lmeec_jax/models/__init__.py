"""Flax NNX modules of SAM 2.1 and LM-EEC. Attribute paths mirror the torch state dict."""
