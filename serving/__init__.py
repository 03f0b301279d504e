"""Serving: a batching decode engine, assistant-output parsing and the OpenAI-compatible API.

- ``serving.engine``: ``Engine`` runs one background thread that decodes every pending request
  together with ``model.generate.generate_tokens`` and streams per-request events.
- ``serving.chat``: splits raw assistant text into ``reasoning_content``, ``content`` and OpenAI
  ``tool_calls`` (incrementally, for streaming, and in one go).
- The HTTP layer lives in ``scripts/serve_openai_api.py``; the Streamlit demo in
  ``scripts/web_demo.py``.
"""
