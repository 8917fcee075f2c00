"""What this machine can run, checked before work starts (no torch import at module level)."""

from __future__ import annotations

from assistant_forge.errors import ForgeError


def check_4bit_available(device: str) -> None:
    """QLoRA needs bitsandbytes able to run 4-bit on this device; say so plainly if it cannot."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # ImportError, or a broken native library
        raise ForgeError(
            f"QLoRA needs bitsandbytes 4-bit support, which is not usable here ({type(e).__name__}); "
            'set method = "lora" in [lora] or install bitsandbytes.'
        ) from None
