"""Headless core: never imports textual, and imports torch only inside functions."""
