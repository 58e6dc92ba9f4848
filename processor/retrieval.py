"""Moved to ``search/retrieval.py``; ``from processor.retrieval import Retriever`` keeps working (re-export)."""
from search.retrieval import Gallery, QueryTokenizer, Retriever, TokenizedText  # noqa: F401

__all__ = ["Retriever", "Gallery", "QueryTokenizer", "TokenizedText"]
