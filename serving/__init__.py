"""Serving: a batching decode engine, assistant-output parsing and the OpenAI-compatible API.

- ``serving.engine``: ``Engine`` runs one background thread that decodes every pending request
  together with ``model.generate.generate_tokens`` and streams per-request events.
- ``serving.chat``: splits raw assistant text into ``reasoning_content``, ``content`` and OpenAI
  ``tool_calls`` (incrementally, for streaming, and in one go).
- ``serving.openai_api``: the FastAPI app (``create_app``) over an engine; its request schema
  and error bodies in ``serving.schema``, its responses (whole and SSE) in ``serving.replies``.
- Entry points: ``scripts/serve_openai_api.py`` (uvicorn) and the Streamlit demo
  ``scripts/web_demo.py``.
"""
