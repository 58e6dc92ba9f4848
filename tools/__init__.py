"""Command-line tools, each run as ``python -m tools.<name>`` from the repository root (summarize, check_dataset)."""
