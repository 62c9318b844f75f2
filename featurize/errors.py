"""User mistakes: `UserError` (a ValueError) and `OptionError` (a bad value of one option,
named by its field). The CLIs print either as one line, no traceback, exit code 2, and name
an option by its flag (`FLAGS`): Python callers read `min_per_class must be at least 1`,
the command line `--min-per-class must be at least 1`."""

from __future__ import annotations

import argparse


class UserError(ValueError):
    """A problem the user can fix (bad path, unknown option, missing weights...).

    The message must name the file or option involved and say how to fix it.
    """


# Option fields whose flag is not "--" + the field with dashes.
FLAGS = {"unfreeze_blocks": "--unfreeze", "flush_rows": "--checkpoint-rows",
         "source": "--from", "augment": "--no-augment", "k": "-k"}


def flag_of(field: str) -> str:
    """The command-line flag of an options field (`min_per_class` -> `--min-per-class`)."""
    return FLAGS.get(field, "--" + field.replace("_", "-"))


class OptionError(UserError):
    """A bad value of one option: `field` (the options dataclass's field or the function's
    argument) and what is wrong with it. str() names the field; the CLIs name the flag."""

    def __init__(self, field: str, problem: str):
        self.field, self.problem = field, problem
        super().__init__(f"{field} {problem}")

    def command_line(self) -> str:
        return f"{flag_of(self.field)} {self.problem}"


def command_line_text(error: UserError) -> str:
    """What the command line says for `error`: an option named by its flag."""
    return error.command_line() if isinstance(error, OptionError) else str(error)


def _raise(name: str, problem: str):
    """An OptionError for a field; a UserError naming a flag given as "--flag"."""
    if name.startswith("-"):
        raise UserError(f"{name} {problem}")
    raise OptionError(name, problem)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes are UserErrors: one line, exit 2, like every other mistake
    (argparse's own would print the whole usage first)."""

    def error(self, message):
        raise UserError(f"{message}; see {self.prog} --help.")


def check_range(option: str, value, low=None, high=None, kind=int):
    """`value` of `option` (a field name, or a "--flag") is a `kind` within [low, high]
    (None: open); else an OptionError. None passes (the option's default applies)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        _raise(option, f"must be {'a number' if kind is float else 'a whole number'}, "
                       f"not {value!r}.")
    if value != value or (low is not None and value < low) or (high is not None and value > high):
        bounds = (f"between {low} and {high}" if low is not None and high is not None
                  else f"at least {low}" if low is not None else f"at most {high}")
        _raise(option, f"must be {bounds}, not {value}.")
    return value


def check_choice(option: str, value, choices, none_ok: bool = False):
    """`value` of `option` is one of `choices` (None too with `none_ok`); else an
    OptionError."""
    if value is None and none_ok:
        return
    if value not in choices:
        _raise(option, f"must be {' or '.join(map(str, choices))}, not {value!r}.")


def check_flag(option: str, value, allow_none: bool = False):
    """`value` of an on/off option is True or False (or None with `allow_none`)."""
    if value is None and allow_none:
        return
    if not isinstance(value, bool):
        _raise(option, f"must be True or False, not {value!r}.")


def run_command(command, *args) -> int:
    """Run a command-line action: a UserError is one line on stderr and exit code 2; Ctrl-C is
    exit code 130 (work already done has been committed where it was made)."""
    import sys
    try:
        code = command(*args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return code
    except UserError as e:
        print(f"error: {' '.join(command_line_text(e).split())}", file=sys.stderr)  # one line
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `... | head` closed the output early: not an error of ours
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 141
