"""A model file or name in, calibrated probabilities per face out: the one inference path."""
