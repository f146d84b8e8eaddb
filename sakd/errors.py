"""The errors a user can fix, one type per layer, each with a one-line message that names the problem
and the fix. ``sakd`` (the CLI) catches :class:`SakdError` once and prints that line; ``--debug``
shows the traceback.

=====================  ========================================================================
``ConfigError``        a recipe or override: unknown key, bad value, contradictory settings
``DataError``          the text: missing/empty/unparsable file, too short for one block
``SetupError``         what the run is built from: models, tokenizers, teacher placement,
                       the pairing of teacher and student, this machine (GPU architecture)
``RunDirError``        the run directory: another run there, a bad ``--resume`` target
``CheckpointError``    writing or reading a checkpoint (the other checkpoints are untouched)
``TrainingError``      the run itself cannot go on (too many non-finite steps in a row)
``ExportError``        exporting a student from a run directory
``ReportError``        drawing a run's metrics
=====================  ========================================================================
"""

from __future__ import annotations


class SakdError(Exception):
    """A problem the user can fix; ``str(error)`` is one line."""


class ConfigError(SakdError, ValueError):
    """A config problem; the message names the key."""


class DataError(SakdError, ValueError):
    """A data problem; the message names the file or dataset."""


class SetupError(SakdError, RuntimeError):
    """The run cannot be built as configured (models, tokenizers, teacher, pairing, machine)."""


class RunDirError(SakdError, RuntimeError):
    """The run directory cannot be used as asked."""


class CheckpointError(SakdError, RuntimeError):
    """A checkpoint could not be written or read."""


class TrainingError(SakdError, RuntimeError):
    """Training cannot go on (for example too many non-finite steps in a row)."""


class ExportError(SakdError, RuntimeError):
    """The run cannot be exported as asked."""


class ReportError(SakdError, ValueError):
    """A run's metrics cannot be drawn."""
