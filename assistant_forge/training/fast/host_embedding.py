"""The input embedding table in pinned host memory, read by the GPU in place (offloaded plans).

A frozen input embedding is only gathered from: with CUDA's unified addressing, F.embedding's kernel
reads the rows a batch needs straight out of pinned host memory (16 MiB over PCIe for a 2048-token
row at hidden 4096) instead of the device holding vocab x hidden (0.375 GiB at 7B, vocab 49152).
Same values, no copies issued from Python, no sync: generation and training call the module as before.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from assistant_forge.training.fast.plumbing import unwrap

# __cuda_array_interface__ has no bfloat16: the buffer is described as integers of the same width.
_SAME_WIDTH = {2: (torch.int16, "<i2"), 4: (torch.int32, "<i4")}


def device_view(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CUDA tensor over the pinned host tensor `host`'s memory (no copy); keep `host` alive."""
    if not host.is_pinned() or not host.is_contiguous():
        raise ValueError("device_view needs a pinned, contiguous host tensor")
    as_int, typestr = _SAME_WIDTH[host.element_size()]
    raw = host.view(as_int)
    iface = {"shape": tuple(raw.shape), "typestr": typestr, "data": (raw.data_ptr(), False), "version": 3}
    view = torch.as_tensor(types.SimpleNamespace(__cuda_array_interface__=iface), device=device)
    return view.view(host.dtype)


def offload_input_embedding(model: nn.Module) -> int:
    """Move the model's frozen, untied input embedding table to pinned host memory, read in place.

    Returns the device bytes freed (0 when it stays: on CPU, trainable, or tied to the output head,
    whose matmul would read the whole table over PCIe every step)."""
    base = unwrap(model)
    emb = base.get_input_embeddings()
    head = base.get_output_embeddings()
    if emb is None or not isinstance(emb, nn.Embedding):
        return 0
    w = emb.weight
    if not w.is_cuda or w.requires_grad or (head is not None and head.weight is w):
        return 0
    host = w.detach().to("cpu").pin_memory()
    emb.weight = nn.Parameter(device_view(host, w.device), requires_grad=False)
    emb._forge_host_table = host  # the view does not own its memory
    return host.numel() * host.element_size()
