"""Tracking: the LM-EEC frame step and the fixed-slot memories it runs over (``lax.scan``)."""
