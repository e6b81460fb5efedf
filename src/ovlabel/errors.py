"""Typed errors for everything a user can get wrong.

Every error a user can act on derives from :class:`OvlabelError`, and also from the builtin exception
that describes it best (``ValueError``, ``FileNotFoundError``…), so ``except ValueError`` keeps working.
Messages say what was wrong and what was expected.
"""

from __future__ import annotations


class OvlabelError(Exception):
    """Base class of all ovlabel errors."""


class InputError(OvlabelError, ValueError):
    """A tensor, file or argument does not have the shape, type or content that was expected."""


class UnsupportedModelError(OvlabelError, ValueError):
    """The model (or its image tower) is not one ovlabel can explain."""


class ConfigError(OvlabelError, ValueError):
    """A configuration file or override is invalid."""


class ModelLoadError(OvlabelError, RuntimeError):
    """Model weights could not be found, fetched or loaded."""


class ImageReadError(OvlabelError, ValueError):
    """An image file could not be decoded."""


class CocoFormatError(OvlabelError, ValueError):
    """A COCO file is malformed or inconsistent with its ground truth."""


class OutputError(OvlabelError, OSError):
    """An output file could not be written (disk full, no permission…); finished work is kept."""


class EngineError(OvlabelError, RuntimeError):
    """An execution engine (Ray) failed: a lost node or actor, a cluster that went away."""
