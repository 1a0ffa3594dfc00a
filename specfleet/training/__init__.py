"""Fine-tuning the target for self-drafting: SPACE's semi-autoregressive SFT (`specfleet train-space`)."""
