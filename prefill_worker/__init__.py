"""The prefill worker: computes prompts' KV in batches, reusing its prefix cache, pushes it
a layer group at a time into the decode worker's reserved blocks, and returns the first token."""
