"""The one exception type for user mistakes: the CLIs print it as one line, no traceback."""

from __future__ import annotations

import argparse


class UserError(Exception):
    """A problem the user can fix (bad path, unknown option, missing weights...).

    The message must name the file or option involved and say how to fix it.
    """


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes are UserErrors: one line, exit 2, like every other mistake
    (argparse's own would print the whole usage first)."""

    def error(self, message):
        raise UserError(f"{message}; see {self.prog} --help.")


def check_range(option: str, value, low=None, high=None, kind=int):
    """`value` of `option` is a `kind` within [low, high] (None: open); else a UserError.
    None passes (the option's default applies)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise UserError(f"{option} must be {'a number' if kind is float else 'a whole number'}, "
                        f"not {value!r}.")
    if value != value or (low is not None and value < low) or (high is not None and value > high):
        bounds = (f"between {low} and {high}" if low is not None and high is not None
                  else f"at least {low}" if low is not None else f"at most {high}")
        raise UserError(f"{option} must be {bounds}, not {value}.")
    return value


def run_command(command, *args) -> int:
    """Run a command-line action: a UserError is one line on stderr and exit code 2; Ctrl-C is
    exit code 130 (work already done has been committed where it was made)."""
    import sys
    try:
        code = command(*args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return code
    except UserError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)  # always one line
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `... | head` closed the output early: not an error of ours
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 141
