"""The transformer: Llama-family decoder (Llama, Mistral-style, Qwen2) over the paged cache."""
