"""Model building blocks: ViT encoder, I-JEPA predictor."""
