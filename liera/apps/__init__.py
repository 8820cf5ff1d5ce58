"""Applications built on the library: the `liera` command line (`demo`, `finetune`, `merge`, `inspect`,
`convert`), the method table, the training loops and arms they share, the language-model path, the carried data
sets and the exact memory counter they report.

Nothing in the library core (``liera/*.py``, ``generators/``, ``layers/``) imports from here.
"""
