"""Exceptions that carry a message meant for the user of the command line."""


class SpeechLMBridgeError(Exception):
    """Invalid input or a failed step, with a message that names the file, key or value and the fix.

    The CLI prints the message without a traceback and exits with status 1.
    """


class CheckpointError(SpeechLMBridgeError):
    """A checkpoint that is missing, unreadable or not in a layout this tool reads."""


class ConfigError(SpeechLMBridgeError):
    """An experiment, backbone or model config with a missing or invalid key."""


class PromptError(SpeechLMBridgeError):
    """A dialog or chat template that cannot be rendered exactly."""
