"""The command-line shells: ``aoi-train`` (``train.py``) and ``aoi-evaluate`` (``evaluate.py``); each module's
``main(argv=None)`` parses argv, makes one library call and writes the report files (setup.cfg
``console_scripts``; the top-level ``train.py`` and ``evaluate.py`` of a checkout call the same ``main``)."""

import functools
import sys

from aoi_jax import integrity


def storage_failures_exit(main):
    """Wraps a command's ``main``: a storage failure (a full disk, quota, file-size limit, read-only folder;
    ``integrity.failure_message``) ends it with that short message on stderr and exit status 1, no traceback;
    every other error propagates."""
    @functools.wraps(main)
    def wrapped(argv=None):
        try:
            return main(argv)
        except OSError as e:
            message = integrity.failure_message(e)
            if message is None:
                raise
            sys.exit(message)
    return wrapped
