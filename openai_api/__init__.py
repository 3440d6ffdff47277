"""The OpenAI-compatible HTTP API of the router: `/v1/completions`, `/v1/chat/completions`
(streamed as server-sent events or not), `/v1/models` and `/health`, on FastAPI and uvicorn in
the router's own event loop. A thin front, as `router.service` is for gRPC: it validates the
body, renders a chat with the model's template, and streams `router.Router.generate`.
"""
