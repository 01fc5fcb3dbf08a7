"""Errors written for people; the command line prints their message without a traceback."""


class ConfigError(ValueError):
    """A configuration value outside its allowed range; the message names the field."""
