"""Inference: the public :class:`Predictor`, the split runner and the submission files."""
