"""Errors that quantscale reports to users in plain words."""


class QuantscaleError(Exception):
    """A problem with the user's input or request; the CLI prints it without a traceback."""


class CheckpointError(QuantscaleError):
    """A checkpoint on disk is missing, truncated or inconsistent."""


class OutputExistsError(QuantscaleError):
    """The output path exists and overwriting was not asked for."""
