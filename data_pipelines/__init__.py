"""Data pipelines: the official file formats (``formats``), WebDataset shard writers (``shards``)
and readers (``readers``), tokenizer, masking, the built-in dataset and the LightningDataModules.
Stands alone: it depends on no other package of the project (neither ``tasks`` nor ``mmmoe``)."""
