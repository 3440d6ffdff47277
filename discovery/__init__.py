"""How the router learns which workers exist: the `WorkerSource` interface (`base.py`) and its
Kubernetes implementation, a watch of the worker pods (`kubernetes.py`, the pod contract in
`pods.py`). The Redis registry (`index.registry.WorkerRegistry`) is the other implementation."""
