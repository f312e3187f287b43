"""Landmark database cleaning (Boiarov & Tyantov §3.1): per-landmark clustering, duplicates,
images closer to another landmark or to non-landmarks; a cleaned manifest and an HTML report.

``cleaning.algorithm`` decides on embedding arrays (no torch); ``cleaning.command`` is
``landmarks clean`` (embeddings, files, report). Import from those modules directly.
"""
