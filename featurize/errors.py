"""The one exception type for user mistakes: the CLIs print it as one line, no traceback."""


class UserError(Exception):
    """A problem the user can fix (bad path, unknown option, missing weights...).

    The message must name the file or option involved and say how to fix it.
    """
