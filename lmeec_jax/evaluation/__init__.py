"""Evaluation: the official EgoExo4D metrics, the scoring protocols and ground-truth files."""
