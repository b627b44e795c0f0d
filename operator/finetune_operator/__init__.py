"""FineTune Operator: self-service LLM fine-tuning on a Kubernetes GPU cluster."""

__version__ = "0.1.0"
