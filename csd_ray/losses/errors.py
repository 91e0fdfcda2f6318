"""Errors raised for bad loss parameters or inputs: each names the offending parameter."""


class LossConfigError(ValueError):
    """A loss was asked for with an unknown name or an invalid parameter."""


class LossInputError(ValueError):
    """Tensors handed to a loss have incompatible shapes or types."""
