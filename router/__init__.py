"""Tandem's router: the public `Router` gRPC service, tokenizing, prefix lookup, choosing a
(prefill, decode) pair per request (`router.policies`), retries, admission and streaming back.

It never imports `kv_transfer`, torch or the model; it uses the engine's block hashing only.
"""
