"""Data pipelines: shard writing, the WebDataset loader, synthetic data and dataset converters."""
