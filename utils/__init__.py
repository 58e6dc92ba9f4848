"""The bottom layer (imports nothing else of the project): options, the run directory, files, metrics, DDP helpers,
the tokenizer, logging, entry-point handling."""
