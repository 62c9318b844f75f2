"""Engines: the local pipeline (decoding workers feeding batches to an extractor) and Ray Data
(decoding tasks and an actor pool writing cache shards)."""
