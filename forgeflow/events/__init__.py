"""Realtime messages: their models, the sinks a run emits them to, and the spool that keeps them
while the API is away."""
