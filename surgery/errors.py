"""Errors that mean "the user's input is wrong": the CLI prints them as one line and exits 2."""


class SurgeryError(Exception):
    """Bad input (a model spec, a plan, a recipe, a file): reported as one line, never a traceback."""


class ModelLoadError(SurgeryError):
    """A model spec that does not resolve to a loadable Wan transformer."""


class PlanError(SurgeryError):
    """A plan that is malformed or does not fit the model it is applied to."""
