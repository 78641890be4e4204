"""Fitting models with Lightning: the loop, precision, calibration. Lightning lives only here."""
