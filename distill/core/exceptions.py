"""Errors the project raises on purpose. Each message says what was wrong and what to do."""


class DistillError(Exception):
    """Base class of every deliberate error."""


class ConfigError(DistillError):
    """The configuration is invalid; raised at start-up."""


class BrokerError(DistillError):
    """The embedded broker could not be found, started or reached."""


class TopicMismatchError(ConfigError):
    """The examples and labels topics disagree (for example in partition count)."""


class DecodeError(DistillError):
    """A message could not be decoded. ``reason`` is a short machine-readable tag for the DLQ."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class DeliveryError(DistillError):
    """Kafka reported that produced messages were not delivered."""


class CheckpointError(DistillError):
    """No usable checkpoint could be read where one was expected."""
