"""What the ``sakd`` command prints besides its own output: one place for library logging.

Without ``--debug`` the terminal shows sakd's own log records (warnings and above) and the libraries' errors,
and none of the libraries' warnings and info lines -- including what they print while being imported (a
bitsandbytes/kernels hub check, DeepSpeed's accelerator probe, transformers' deprecation notes). With ``--debug`` everything is
shown at INFO. The heavy libraries are imported only by :func:`runtime`, which the commands call once they
have parsed and validated their input: ``sakd --help`` and argument or config errors import no torch.
"""

from __future__ import annotations

import logging
import os
import sys

_DEBUG = False

# Libraries that configure their own logger at import time read these first (a handler added before the
# import would be replaced): transformers, datasets and huggingface_hub take their level from them.
_QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "DATASETS_VERBOSITY": "error",
    "HF_HUB_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
}
# Loggers with a handler of their own (records never reach the root handler): a filter set on the logger
# before the import survives it (the library resets the level, not the filters).
_OWN_HANDLER_LOGGERS = ("DeepSpeed",)


_SAKD_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


class _OnlySakd(logging.Filter):
    """sakd's own records, any library's errors, and Python warnings raised from sakd's code (their text
    starts with its path)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        if record.name == "py.warnings":
            return str(record.args[0] if record.args else record.msg).startswith(_SAKD_DIR)
        return record.name == "sakd" or record.name.startswith("sakd.")


class _OnlyErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


def setup(debug: bool) -> None:
    """Route logging and Python warnings to stderr through one handler, filtered unless ``debug``."""
    global _DEBUG
    _DEBUG = debug
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if debug else logging.WARNING)
    logging.captureWarnings(True)  # warnings.warn -> the "py.warnings" logger -> the filter below
    if debug:
        return
    handler.addFilter(_OnlySakd())
    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)
    for name in _OWN_HANDLER_LOGGERS:
        logging.getLogger(name).addFilter(_OnlyErrors())


def runtime() -> None:
    """Import torch and set what must be set before DeepSpeed and accelerate are imported.

    Called by each command right before it needs the heavy libraries (after its input is validated).
    """
    import torch

    if not torch.cuda.is_available():
        # DeepSpeed (imported by accelerate/transformers) otherwise probes for an accelerator and logs
        # that it fell back to CPU, on stdout, through its own handler.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if _DEBUG:
        return
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.disable_progress_bar()


def is_out_of_memory(error: BaseException) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(error, torch.OutOfMemoryError)
