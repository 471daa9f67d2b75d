"""The ``cachequant`` command line."""
