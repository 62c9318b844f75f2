"""The one exception type for user mistakes: the CLIs print it as one line, no traceback."""


class UserError(Exception):
    """A problem the user can fix (bad path, unknown option, missing weights...).

    The message must name the file or option involved and say how to fix it.
    """


def run_command(command, *args) -> int:
    """Run a command-line action: a UserError is one line on stderr and exit code 2; Ctrl-C is
    exit code 130 (work already done has been committed where it was made)."""
    import sys
    try:
        return command(*args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
