"""Interop: weights in and out (official MAE / timm files, torch.save files without torch)."""
