"""Exceptions sga_jax raises for bad input.

Every error a user can cause derives from :class:`SgaJaxError`, so the command line can turn it into
one clear line and exit code 2 instead of a traceback from deep inside JAX.
"""

from __future__ import annotations


class SgaJaxError(ValueError):
    """Base class: a problem with the user's input, reported in one line."""


class ConfigError(SgaJaxError):
    """A configuration value is unknown, misspelt, of the wrong type or out of range."""


class ModelLoadError(SgaJaxError):
    """A model directory or file cannot be loaded (unsupported type, missing/misshapen tensor, pickle)."""


class DataError(SgaJaxError):
    """A data file is missing, malformed, empty, or a row cannot be used."""


class DivergenceError(SgaJaxError):
    """Training produced NaN/inf or left the allowed range."""
