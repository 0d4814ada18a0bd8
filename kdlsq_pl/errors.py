"""One error type for bad input, printed by ``run.py`` as a single line with a non-zero exit."""


class ConfigError(ValueError):
    """A configuration value, file or directory that cannot be used.

    The message is one line naming the field (or path), the bad value and what is allowed,
    e.g. ``quant.weight_bits=9 is out of range; allowed: 2..8 or 32 (full precision)``.
    """


class NumericalError(RuntimeError):
    """A NaN/Inf loss or step size stopped training; the message names the step and the module."""
