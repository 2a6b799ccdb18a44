"""Evaluation: linear probing, fine-tuning and k-NN from a pre-training workdir."""
