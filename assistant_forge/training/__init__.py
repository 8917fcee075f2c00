"""The trainer side: runs only inside the detached process (`python -m assistant_forge.training RUN`)."""
