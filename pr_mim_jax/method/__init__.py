"""The method: token split and masks, furthest sampling, targets, losses, the three methods,
the FLOP model."""
