"""The stages of a run, one file each: ``teacher`` (fine-tune once per recipe), ``student`` (the ``method``'s
compressed student), and what both share (``common``: datamodule, trainer, fit with resume)."""
