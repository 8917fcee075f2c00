import os

# Lower reserved GPU memory for the fitted plans; must be set before CUDA starts (harmless on CPU).
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

from assistant_forge.training.trainer import main  # noqa: E402

raise SystemExit(main())
