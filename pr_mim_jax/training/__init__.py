"""Training: the shared loop (trainer.py), the pre-training loop and step, state, optimizer,
checkpoints, metrics, the k-NN monitor, config checks, and the pictures the loop draws."""
