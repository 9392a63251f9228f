"""hydraopt-mobile: many LoRA task adapters of one LLM on a phone."""
