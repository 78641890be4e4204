"""Fitting models with Lightning: the loop, precision, calibration, tracking, and sharding work over processes.
Lightning lives only here."""

import logging
import warnings

# Lightning lives in this layer; its chatter that says nothing to a ferlab user is quieted once, here
for _name in (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.pytorch.accelerators.cuda",
    "lightning.fabric.utilities.seed",
):
    logging.getLogger(_name).setLevel(logging.WARNING)
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*")
warnings.filterwarnings("ignore", ".*module\\(s\\) in eval mode.*")  # the frozen part, on purpose
