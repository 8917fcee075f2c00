"""assistant_forge: turn a chat LLM into your own assistant, from a terminal."""

__version__ = "0.1.0"
