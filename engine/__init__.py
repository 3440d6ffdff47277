"""Tandem's engine: model, paged KV cache, block manager, kernels, sampler and step loop.

It knows no network and no protobuf; the workers and the router build on it.
"""
