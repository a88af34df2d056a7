"""The one place kubrpc's version lives (pyproject.toml reads it from here)."""

__version__ = "0.1.0"
