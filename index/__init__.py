"""The Redis-backed cluster state: the prefix index (writer, reader, the router's in-memory
tail, key layout) and the worker registry, over one bounded Redis client."""
