"""One exception type for everything a user can get wrong.

The CLI prints `surgeon: error: <message>` (one line per problem) and exits non-zero; no
traceback. Messages say what is wrong and where: file:line, field path, module or tensor name.
"""


class SurgeonError(Exception):
    """Bad input: a recipe, a model directory, a diff, an action aimed at the wrong module."""


class RecipeError(SurgeonError):
    """A recipe failed validation; `problems` holds every error found, each already located."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class CheckpointError(SurgeonError):
    """A model directory or a diff directory is missing, incomplete, corrupt or mismatched."""


class Interrupted(SurgeonError):
    """The command was stopped by a signal (Ctrl-C: SIGINT, or SIGTERM); the CLI exits 128 + its
    number (130, 143), as shells report a process killed by that signal."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.signal_number = signal_number
