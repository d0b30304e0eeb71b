"""Typed exceptions. The CLI prints ``str(exc)`` as one line and exits with code 2."""

from __future__ import annotations


class CryovesError(Exception):
    """Base class of every error the library raises on purpose (bad input, bad settings)."""


class InputError(CryovesError):
    """An input file or array is missing, unreadable or unusable."""


class FormatError(InputError):
    """A file exists but is not valid in the format its name or content claims."""


class VoxelSizeError(InputError):
    """The voxel size is missing, implausible, or inconsistent."""


class OutputError(CryovesError):
    """An output cannot be written (exists without --force, unwritable folder, full disk)."""


class OutputExistsError(OutputError):
    """The output already holds a result and --force was not given."""


class ModelError(CryovesError):
    """A network model or weight file is missing, corrupt, or incompatible."""


class ParameterError(CryovesError):
    """A parameter value is out of its valid range."""


class ResourceError(CryovesError):
    """Not enough memory (or another resource) for the requested settings."""


class Cancelled(CryovesError):
    """A long-running step was cancelled by the caller (e.g. the napari widget)."""
