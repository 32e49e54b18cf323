"""`python -m train`: LM-EEC training (see ``train/__main__.py``)."""
