"""The user errors of every subcommand: what `pneumomap.cli` turns into exit status 2 and one message.

The convention of every ``pneumomap`` subcommand (README "Exit status"): 0 ok, 1 some images
failed (each listed, the run complete otherwise), 2 unusable input or configuration, with the
problem on stderr and no traceback. A user error is an instance of `UserError` or of one of the
classes in `USER_ERRORS`: the errors that other modules raise about what the user gave (a
pipeline file, a recipe, a checkpoint, a path), named here so that finding them imports nothing.
"""
from __future__ import annotations

# "module.Class" of the exceptions that mean "unusable input or configuration" (checked along the
# exception's class hierarchy by name, so a subclass counts and nothing is imported to check)
USER_ERRORS: frozenset[str] = frozenset({
    "pneumomap.errors.UserError",
    "pneumomap.infer.spec.PipelineError",
    "pneumomap.infer.inputs.RunError",
    "pneumomap.infer.tune.options.TuneError",
    "pneumomap.train.recipes.RecipeError",
    "pneumomap.stages.base.ConfigError",
    "pneumomap.stages.reader.UnreadableImageError",
    "pneumomap.labels.LabelError",
    "pneumomap.submission.SubmissionError",
    "pneumomap.package.PackageError",
    "pneumomap.fileio.FolderLockedError",
    # a path that is not there, not a folder, a folder where a file was expected, or not ours to write
    "builtins.FileNotFoundError", "builtins.NotADirectoryError", "builtins.IsADirectoryError",
    "builtins.PermissionError", "builtins.FileExistsError",
})


class UserError(Exception):
    """Unusable input or configuration; the message names the file or option and what is wrong."""


def is_user_error(error: BaseException) -> bool:
    """Whether ``error`` (or a class it derives from) is a user error (`USER_ERRORS`)."""
    return any(f"{cls.__module__}.{cls.__qualname__}" in USER_ERRORS for cls in type(error).__mro__)
