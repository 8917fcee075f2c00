"""Checkpoints that appear whole or not at all (ForgeTrainer), and a full disk reported as one."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from transformers import Trainer
from transformers.trainer_utils import rotate_checkpoints

from assistant_forge.core.fsutil import atomic_write_json
from assistant_forge.core.runs import COMPLETE_MARKER, now_iso
from assistant_forge.training import base_anchor, distributed
from assistant_forge.training.base_anchor import KL_TARGET, REPLAY
from assistant_forge.training.data import REAL_TOKENS

STAGING_PREFIX = ".saving-"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for p in [*folder.rglob("*"), folder]:
        _fsync(p)


def remove_stale_staging(checkpoints: Path) -> None:
    """Half-written saves of a trainer that was killed; only the lock holder calls this."""
    for d in checkpoints.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(d, ignore_errors=True)


class ForgeTrainer(Trainer):
    """A Trainer whose checkpoints appear whole or not at all (and that counts real tokens, below).

    Trainer writes each checkpoint into a hidden staging folder beside the others; once every file is
    written and synced, the completeness marker goes in and the folder is renamed to checkpoint-N in one
    step. A trainer killed mid-save leaves only a staging folder, which nothing reads and the next trainer
    removes. The marker stays the test of completeness (checkpoints of older versions carry it too).
    """

    _staging: str | None = None
    kl_to_base = 0.0  # train.kl_to_base (training.base_anchor), set by the trainer

    def training_step(self, model: Any, inputs: dict, *args: Any, **kwargs: Any) -> Any:
        # Tokens are counted here, as the micro-batch is trained on: the collator runs ahead of the
        # step, and the Trainer's own count includes padding and syncs with the GPU each micro-batch.
        # state.num_input_tokens_seen is saved with each checkpoint, so a resumed run goes on counting.
        self.state.num_input_tokens_seen += distributed.sum_over_ranks(inputs.pop(REAL_TOKENS, 0))
        return super().training_step(model, inputs, *args, **kwargs)

    def compute_loss(self, model: Any, inputs: dict, *args: Any, **kwargs: Any) -> Any:
        # train.kl_to_base: the base model's logits at the replay answers go to the training forward.
        replay = inputs.pop(REPLAY, None)
        if replay is None or not self.kl_to_base:
            return super().compute_loss(model, inputs, *args, **kwargs)
        peft_model = self.accelerator.unwrap_model(model)
        target = base_anchor.base_target(model, peft_model, inputs, replay, self.kl_to_base)
        if target is None:
            return super().compute_loss(model, inputs, *args, **kwargs)
        try:
            return super().compute_loss(model, {**inputs, KL_TARGET: target}, *args, **kwargs)
        finally:
            target.close()

    def _get_output_dir(self, trial: Any) -> str:
        return self._staging or super()._get_output_dir(trial)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        root = Path(self.args.output_dir)
        main_rank = distributed.is_main()
        final = root / f"checkpoint-{self.state.global_step}"
        staging = None
        if main_rank:
            root.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=root, prefix=f"{STAGING_PREFIX}{self.state.global_step}-"))
        # Every process writes into rank 0's staging folder (each its own RNG state).
        staging = Path(distributed.broadcast(str(staging) if staging else ""))
        self._staging = str(staging)
        t0 = time.time()
        try:
            super()._save_checkpoint(model, trial)
            distributed.barrier()
            if main_rank:
                written = staging / final.name
                atomic_write_json(
                    written / COMPLETE_MARKER, {"step": self.state.global_step, "time": now_iso()}
                )
                _fsync_tree(written)
                if final.exists():  # an incomplete leftover of the same step
                    shutil.rmtree(final)
                os.replace(written, final)
                _fsync(root)
                print(f"{final.name} saved in {time.time() - t0:.1f} s", flush=True)
        except Exception as e:
            disk_full = as_disk_full(e, root)
            if disk_full is e:
                raise
            raise disk_full from e
        finally:
            self._staging = None
            if main_rank:
                shutil.rmtree(staging, ignore_errors=True)
        distributed.barrier()
        if not main_rank:
            return
        rotate_checkpoints(
            output_dir=str(root),
            save_total_limit=self.args.save_total_limit,
            best_model_checkpoint=self.state.best_model_checkpoint,
            use_mtime=False,
        )


_DISK_FULL_TEXT = (
    "no space left on device",
    "file too large",
    "disk quota exceeded",
    "storagefull",
    "filetoolarge",
)


def as_disk_full(e: BaseException, folder: Path | None = None) -> BaseException:
    """safetensors and torch.save report a full disk as their own error types; make it an OSError again.

    torch.save may say no more than "unexpected pos 382144 vs 382036": when a write into `folder` failed
    and its filesystem has (almost) no space left, that was the cause.
    """
    if isinstance(e, OSError):
        return e
    text = str(e).lower()
    for code in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        if os.strerror(code).lower() in text:
            return OSError(code, os.strerror(code))
    if any(t in text for t in _DISK_FULL_TEXT):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with contextlib.suppress(OSError):
        if folder is not None and shutil.disk_usage(folder).free < 16 * 2**20:
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return e
