"""Errors lorp-fx raises on bad input.

Every error says what is wrong and what the user can do about it; the CLI prints
`str(error)` on one line and exits non-zero, so the message must stand alone.
"""


class LoRPError(Exception):
    """Base class of every error lorp-fx raises on purpose."""


class TraceError(LoRPError):
    """The model could not be turned into a torch.fx graph."""


class InputMismatchError(LoRPError):
    """The example or calibration inputs do not fit the model."""


class FixedArgumentError(InputMismatchError):
    """A call of a traced graph with a non-tensor argument other than the one it was traced with."""


class NoResidualBlocksError(LoRPError):
    """The graph has no residual block of the form x + f(x)."""


class UnknownBlockError(LoRPError, KeyError):
    """A block name that the graph does not have."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class NotRemovableError(LoRPError):
    """A block whose removal would give a wrong graph."""


class BudgetError(LoRPError, ValueError):
    """A pruning budget that cannot be met."""


class CalibrationError(LoRPError):
    """Calibration data or the statistics collected from it are unusable."""


class SelectorError(LoRPError, ValueError):
    """A selection method that does not exist or lacks what it needs."""
