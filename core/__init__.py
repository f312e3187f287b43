"""The bottom layer: small pieces every other package uses, importing no other project package.

* :mod:`core.labels` — the non-landmark label convention;
* :mod:`core.errors` — :class:`~core.errors.UserError`, a mistake in the user's input that the
  command line reports in one line;
* :mod:`core.atomic` — the one way this project writes an output file (temporary name + rename);
* :mod:`core.provenance` — the git commit and dirty flag a result came from;
* :mod:`core.tables` — the text-CSV reader (every cell a string) and the empty-ratio rule;
* :mod:`core.accumulator` — :class:`~core.accumulator.EmbeddingAccumulator`, rows gathered across
  DDP ranks into dataset order;
* :mod:`core.embedding` — the one routine that embeds a set of images with a model.
* :mod:`core.launched_ranks` — rank 0 of a script-launched DDP run stops the ranks it launched
  when it fails, instead of leaving them in the rendezvous for 30 minutes.
* :mod:`core.fork_safety` — tqdm's monitor thread is off: a thread born next to a data-loader
  fork can deadlock the child (CPython gh-112275); switched off here, at import, so every entry
  point gets it before its first progress bar.
* :mod:`core.allocator` — freed memory stays in the process (glibc's mmap and heap trimming off),
  so large tensors are not faulted in page by page at every step; the command line switches it on.

Nothing here imports Lightning's Trainer, the data modules or the losses: this layer must stay
importable on its own (``tests/test_layers.py`` enforces it).
"""

from core.fork_safety import no_progress_bar_thread

no_progress_bar_thread()
