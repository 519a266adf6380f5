"""The one kind of error a user can fix: run_cli (engine/cli.py) prints its message as one line, no traceback.

It stands at the bottom of engine/ so that every module raising one, and run_cli catching it, import it from
here, and run_cli needs none of the modules it runs.
"""


class UserError(Exception):
    """A mistake in what the user gave (config, checkpoint, data, run folder); the message says what to change."""
