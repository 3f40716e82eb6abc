"""bnaudit's version: its one source (the package, every file bnaudit writes, and the distribution's metadata)."""

__version__ = "0.1.0"
