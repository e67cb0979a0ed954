"""The tool's own error types.

Every mistake a user can make (a bad file, an unknown label, a wrong option) raises a
``HierclsError`` whose message names the file, label or line and says how to fix it.
The command line prints that message on one line and exits with status 2; anything
else that escapes is a bug in hiercls.
"""

from __future__ import annotations


class HierclsError(Exception):
    """Base class for errors caused by user input, reported without a traceback."""


class HierclsWarning(UserWarning):
    """Base class of hiercls's warnings: something looks wrong, but the work goes on."""


class TaxonomyError(HierclsError):
    """A taxonomy file or tree is invalid."""


class DataError(HierclsError):
    """A dataset, manifest or image cannot be used as given."""


class ConfigError(HierclsError):
    """A configuration value or command-line option is invalid."""


class CheckpointError(HierclsError):
    """A run directory or checkpoint is missing, incomplete or incompatible."""


class PeerFailedError(HierclsError):
    """Under ``torchrun``: another process (rank 0) refused the run and printed why; this one stops.

    The command line exits with status 2 without printing it, so the reason is shown once.
    """
