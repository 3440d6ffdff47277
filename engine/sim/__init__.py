"""The simulated engine (`--engine sim`): no model; each step sleeps as long as the cost model
says the real engine would take, and samples tokens from a hash of the context. Everything
around it is the real engine's: scheduler, block manager, prefix cache, a tiny KV cache that
the transfer agent registers and moves."""
