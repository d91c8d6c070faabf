"""Training objectives; each builds its trainable module and computes ``loss(batch)``."""
