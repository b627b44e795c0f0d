"""FineTune Operator: self-service LLM fine-tuning on a Kubernetes GPU cluster."""

__version__ = "0.1.0"
#: Audit logs and API priority and fairness tell our requests from other clients' by this (the operator's
#: own client, adapters/rest.py, and ftctl's, client.py).
USER_AGENT = f"finetune-operator/{__version__}"
