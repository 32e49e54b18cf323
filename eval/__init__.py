"""`python -m eval <command>`: prediction, scoring, visualisation and data preparation."""
