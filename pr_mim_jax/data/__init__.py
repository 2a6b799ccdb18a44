"""The input pipeline: the embedded shapes dataset, sources (arrays, image folders, tfds),
augmentation (TF or NumPy), and deterministic, resumable batches."""
