"""Benchmarks shipped with pagescan (``pagescan bench``); nothing runs at import."""
