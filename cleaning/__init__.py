"""Landmark database cleaning (Boiarov & Tyantov §3.1): per-landmark clustering, duplicate landmarks,
images closer to another landmark or to non-landmarks → a cleaned manifest and an HTML report.

Modules (import them directly; this package imports nothing, so worker processes stay light):
``algorithm`` decides on embedding arrays (numpy, fastcluster, FAISS; no torch); ``command`` is
``landmarks clean`` (embeddings, files); ``report`` writes ``report.html``; ``truth`` scores
decisions against known noise; ``tune`` (``landmarks clean-tune``) picks parameters on
held-out landmarks; ``separability`` (``landmarks clean-separability``) measures how well
any threshold on per-image evidence could separate the noise in a model's embedding. Their
command lines live in :mod:`cli.clean`.
"""
