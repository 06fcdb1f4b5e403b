"""OpenAI-compatible chat endpoint serving a model through autopatch (see the server issue)."""
