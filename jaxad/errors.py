"""Errors meant for the person running jaxad.

Every message is one line that names the offending file (or setting) and says what to do about
it; scripts print it without a traceback.
"""


class JaxadError(Exception):
    """Base class: an error caused by the user's input, not by a bug in jaxad."""


class DataError(JaxadError):
    """A dataset, image or mask cannot be used as given."""


class WeightsError(JaxadError):
    """A weight file is missing, unreadable or does not fit the architecture."""


class ConfigError(JaxadError):
    """A configuration value or command-line override is invalid."""


class NumericsError(JaxadError):
    """Features or statistics became non-finite or too ill-conditioned to use."""


class MemoryLimitError(JaxadError):
    """A fit would need more memory than the process may take; raised before the work starts."""
