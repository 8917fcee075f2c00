"""What this machine can run, checked before work starts (no torch import at module level)."""

from __future__ import annotations

from assistant_forge.errors import ForgeError


def check_4bit_available(device: str, installed_only: bool = False) -> None:
    """QLoRA needs bitsandbytes able to run 4-bit on this device; say so plainly if it cannot.

    `installed_only`: only look for the package, for `forge train`'s check before launching: importing
    it loads torch and CUDA libraries (~4 s) that the trainer loads again, and the trainer runs the full
    check (a broken native library) itself, ending with this same sentence as its reason."""
    import importlib.util

    try:
        if installed_only:
            if importlib.util.find_spec("bitsandbytes") is None:
                raise ImportError("bitsandbytes")
            return
        import bitsandbytes  # noqa: F401
    except Exception as e:  # ImportError, or a broken native library
        raise ForgeError(
            f"QLoRA needs bitsandbytes 4-bit support, which is not usable here ({type(e).__name__}); "
            'set method = "lora" in [lora] or install bitsandbytes.'
        ) from None
