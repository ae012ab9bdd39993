"""Corpora, tokenized streams on disk, and sharded batch iterators."""
