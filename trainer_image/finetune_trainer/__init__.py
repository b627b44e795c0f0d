"""The trainer that runs in every FineTuneJob worker pod under torchrun + DeepSpeed."""
