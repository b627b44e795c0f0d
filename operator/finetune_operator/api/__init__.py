"""The FineTuneJob API (finetune.dev/v1alpha1): pydantic models that generate the CRD."""
