"""The ``landmarks`` command line."""
