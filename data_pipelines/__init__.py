"""Data pipelines: WebDataset shard writers and readers, tokenizer, masking, built-in dataset."""
