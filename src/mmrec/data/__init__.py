"""Text sources, tokenised shards and batching for training and evaluation."""
