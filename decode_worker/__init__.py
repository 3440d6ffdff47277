"""The decode worker: reserves KV blocks, receives the prompt's KV over UCX, decodes in a
continuously batched loop and streams tokens; prefills locally when a transfer fails."""
