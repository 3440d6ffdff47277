"""Where the load goes: the Tandem router over gRPC (the default) or an OpenAI-compatible HTTP
endpoint. Each target streams a request's tokens as `Tokens` events and ends with `Finished`."""
