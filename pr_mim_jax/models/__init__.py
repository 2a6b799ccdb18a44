"""The networks: ViT blocks and encoder, the MAE / CrossMAE decoder, progressive
reconstruction of thrown tokens, and the classifier for probing and fine-tuning."""
