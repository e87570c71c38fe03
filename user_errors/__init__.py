"""Bad input, as one exception type that every package raises and the three scripts report.

A `UserError` is a flag, config, table, checkpoint or output path that cannot be used. Its message is one
line that names the problem and the fix. `train.py`, `evaluate.py` and `ablate.py` print these (and only
these) as `error: ...` with exit status 2 (`exit_status.py`); any other exception is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """Bad input; the message names it and the fix. A ValueError, so value checks that catch one still do."""


class MissingInput(UserError, FileNotFoundError):
    """A file or directory the user named does not exist."""
