"""Every error lorp-fx raises on bad input.

Each says what is wrong and what the user can do about it; the CLI prints
`str(error)` on one line and exits with status 2, so the message must stand alone.
"""

import re


class LoRPError(Exception):
    """Base class of every error lorp-fx raises on purpose."""


class ConfigError(LoRPError, ValueError):
    """An option or configuration value that is not allowed."""


class CallError(LoRPError, TypeError):
    """A call with arguments of the wrong kind or number (where Python itself would raise TypeError)."""


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
    """A selection method that does not exist, an option it does not take, or a missing input."""


class PlanError(LoRPError, ValueError):
    """A pruning plan (a dict or a plan.json) that is malformed."""


class CompensationError(LoRPError):
    """A model or a removal that a folded linear map cannot compensate exactly."""


class ModelLoadError(LoRPError):
    """A model or tokenizer that cannot be found or loaded."""


class OutputDirError(LoRPError):
    """An output location that cannot or must not be written."""


class GGUFError(LoRPError):
    """A GGUF file that cannot be read, or a pruning of it that the runtime would misread."""


class DeviceError(LoRPError, ValueError):
    """A device, dtype or process count this machine cannot give."""


class DistributedError(LoRPError):
    """A rank of a multi-process run failed, so the run stopped and wrote nothing."""


def first_line(error: BaseException) -> str:
    """The first line of `error`'s message, without terminal colour codes, or its type's name if it has none:
    what a one-line message quotes of an error raised deep inside torch or transformers."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    line = f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    # "Validation error for field 'x':" says nothing on its own; a line of a page says too much
    return line if len(line) <= 300 else line[:297] + "..."


def describe(error: BaseException) -> str:
    """`TypeName: first line of the message`."""
    line = first_line(error)
    return type(error).__name__ if line == type(error).__name__ else f"{type(error).__name__}: {line}"
