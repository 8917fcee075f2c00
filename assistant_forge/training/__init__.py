"""The trainer side: imported by the trainer process (`python -m assistant_forge.training RUN`) and by
CLI and bench entry points that need torch (data encoding, the GPU benches); never by `core` or `tui`."""
