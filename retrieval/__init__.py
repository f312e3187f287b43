"""Retrieval: FAISS index and chunked search, pure recognition metrics, the DDP embedding accumulator, plots."""
