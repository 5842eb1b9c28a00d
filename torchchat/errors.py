"""Typed errors. Library code raises these with a hint; only `torchchat.cli.main` turns them into one
line on stderr and an exit code."""


class TorchchatError(Exception):
    """Base class: the message is one line saying what is wrong and what to do."""

    exit_code = 1


class UserInputError(TorchchatError):
    """A flag, file or value given by the user is wrong."""

    exit_code = 2


class UnknownModelError(UserInputError):
    """A model name is not in the registry."""


class CheckpointError(UserInputError):
    """A checkpoint is missing, unreadable, truncated, or does not fit the model."""


class TokenizerError(UserInputError):
    """A tokenizer file is missing, of unknown kind, or does not fit the model."""


class ConfigError(UserInputError):
    """A params table / params JSON / config.json is malformed."""


class QuantizationError(UserInputError):
    """A --quantize recipe is invalid or cannot run on the chosen device."""


class DeviceError(UserInputError):
    """The requested device is not available."""


class ContextLengthError(UserInputError):
    """A prompt does not fit in the model's context."""


class ChatTemplateError(UserInputError):
    """A chat template does not parse, or refuses the conversation (e.g. roles out of order)."""


class DownloadError(TorchchatError):
    """A download failed or was refused; the cache is left as it was."""


class DownloadInterrupted(DownloadError):
    """Ctrl-C during a download: what arrived is kept; the exit code is the shell's for SIGINT."""

    exit_code = 130


class ExportError(TorchchatError):
    """Exporting or loading an exported artifact failed."""


class MissingDependencyError(TorchchatError):
    """An optional package is not installed; the message names the install step that brings it."""
