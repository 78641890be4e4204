"""Images in (decode, face crop, preprocess) and datasets (folders, splits, folds)."""
