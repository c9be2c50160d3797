"""The ``aimx`` command line: one module per command group, wired in ``main``."""
