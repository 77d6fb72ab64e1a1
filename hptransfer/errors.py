"""The one error type users see: a one-line message and exit code 2, never a traceback."""


class HptError(Exception):
    """Bad input (config, file, grid): `hpt` prints `hpt: error: <message>` and exits 2."""

    exit_code = 2
