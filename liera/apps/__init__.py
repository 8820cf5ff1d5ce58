"""Applications built on the library: the `liera` command line (`demo`, `finetune`, `merge`, `inspect`), the
small training loop and method arms they share, the carried data sets and the exact memory counter they report.

Nothing in the library core (``liera/*.py``, ``generators/``, ``layers/``) imports from here.
"""
