"""The one exception a user can fix.

`MaskdietError` (and its subclasses: a bad config, an unreachable store, a refused job) is what the command
line prints as one red line with exit code 2. Any other exception is a bug in maskdiet: the command line
says so and shows its traceback with `-v`. Raise a `MaskdietError` whose message names the bad value and the
fix; never classify an exception by the words in its message.
"""

from __future__ import annotations


class MaskdietError(Exception):
    """A problem the user can fix (bad input, config, URL, credentials, cluster address); the message says
    what was wrong and what to do."""


class UserInputError(MaskdietError, ValueError):
    """A bad value given by the user (a flag, a config value, a model size, an image folder's layout).

    Also a `ValueError`, so code that validates values keeps catching it as one."""
