"""Training: the pre-training loop and step, state, optimizer, checkpoints, metrics, the k-NN monitor, config checks, and the reconstruction pictures the loop draws."""
