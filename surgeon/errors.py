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
