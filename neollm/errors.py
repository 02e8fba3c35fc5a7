"""The one exception type for bad user input (config keys, paths, shapes).

The launcher prints its message as a single line and exits with status 2, so every message
must name the setting at fault and what to change.
"""


class ConfigError(ValueError):
    """A setting that cannot work; the message names the setting and the fix."""
