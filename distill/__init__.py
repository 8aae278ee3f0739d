"""online-distill: continuous knowledge distillation of ranking models over Kafka."""

__version__ = "0.1.0"
