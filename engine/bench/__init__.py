"""Engine benchmark: Tandem's aggregated engine vs transformers (and vLLM's CPU build)."""
