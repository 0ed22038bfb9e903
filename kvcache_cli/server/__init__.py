"""``kvcache serve``: an OpenAI-compatible proxy that manages each chat turn's context.

The split follows vLLM's ``entrypoints/openai``: ``protocol`` (the wire format),
``serving_chat`` (a chat turn: session, engine, prompt, upstream, store) and
``api_server`` (the FastAPI app and its routes). ``upstream`` talks to the model
server, ``sessions`` names and locks sessions, ``context`` builds the prompt sent
upstream, ``metrics`` counts for ``/metrics``. Imported only by ``kvcache serve``.
"""
