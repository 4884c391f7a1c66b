"""Training and evaluation systems (Lightning) and the ``mmmoe`` command line."""
