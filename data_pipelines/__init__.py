"""Data pipelines: the official file formats (``formats``), WebDataset shard writers (``shards``)
and readers (``readers``), tokenizer, masking, the built-in dataset and the LightningDataModules.
Stands alone: nothing here imports from ``tasks`` (or from ``mmmoe``)."""
