"""CUDA graphs for checkpointed layers (training.fast.graphs): what decides that a layer call can
replay graphs, and the memory plans that use them. Capture and replay need a GPU: bench/gpu_train.py
--graph-check compares graphed and plain training there (losses and gradients; bench/RESULTS.md)."""

from __future__ import annotations

import pytest
from forge_testing import bench_cfg

from assistant_forge.core import memory as mem

torch = pytest.importorskip("torch")


def _kwargs(seq: int = 8, requires_grad: bool = False) -> dict:
    cos = torch.zeros(1, seq, 4, requires_grad=requires_grad)
    return {
        "attention_mask": None,
        "position_ids": torch.arange(seq).unsqueeze(0),
        "position_embeddings": (cos, torch.zeros(1, seq, 4)),
        "use_cache": False,
    }


def test_signature_describes_one_fixed_computation() -> None:
    from assistant_forge.training.fast.graphs import _signature

    hidden = torch.zeros(1, 8, 16)
    a, b = _signature(hidden, _kwargs()), _signature(torch.ones(1, 8, 16), _kwargs())
    assert a is not None and a == b and hash(a) == hash(b)  # values do not matter, shapes do
    assert _signature(torch.zeros(1, 9, 16), _kwargs(9)) != a  # another row length
    assert _signature(hidden.bfloat16(), _kwargs()) != a
    assert _signature(hidden, {**_kwargs(), "use_cache": True}) != a  # non-tensor arguments count
    # Not graphable: a tensor argument that needs its own gradient, an object such as a KV cache.
    assert _signature(hidden, _kwargs(requires_grad=True)) is None
    assert _signature(hidden, {**_kwargs(), "cache": object()}) is None
    assert _signature(None, _kwargs()) is None


def test_attach_gives_no_graphs_off_a_gpu() -> None:
    from assistant_forge.training.fast import graphs

    layers = [torch.nn.Linear(4, 4) for _ in range(3)]
    assert graphs.attach(layers, 3, rng=False) == []
    assert graphs.plan_of(layers) is None and graphs.pool_bytes(None) == 0


LLAMA7B = mem.REFERENCE_SHAPES["7b"]


def test_graphed_plan_counts_its_static_buffers_and_pool() -> None:
    cfg = bench_cfg(2048, 0.1, compiled=True)
    plain = mem.estimate_memory(cfg, LLAMA7B, checkpointed_layers=32, graphs=False)
    graphed = mem.estimate_memory(cfg, LLAMA7B, checkpointed_layers=32, graphs=True)
    d_in = 2048 * 4096 * 2
    assert graphed.graphs and not plain.graphs
    # Every layer's input and output buffer, two gradient buffers, one layer's adapter gradients.
    assert graphed.graph_buffers == 35 * d_in + 4_997_120 * 4
    assert graphed.checkpoint_inputs == 0 and graphed.total > plain.total
    assert "replayed as CUDA graphs" in graphed.summary()
    # No graphs where nothing is checkpointed; with inputs on the host only when asked for.
    assert not mem.estimate_memory(cfg, LLAMA7B, checkpointed_layers=0, graphs=True).graphs
    assert not mem.estimate_memory(cfg, LLAMA7B, checkpointed_layers=32, offload=True).graphs
    off = mem.estimate_memory(cfg, LLAMA7B, checkpointed_layers=32, offload=True, graphs=True)
    # Offloaded: three input buffers used in turn, two the backward reads, the same gradient buffers.
    assert off.graphs and off.graph_buffers == 7 * d_in + 4_997_120 * 4
    assert off.checkpoint_inputs == 0 and off.total < graphed.total
    # Default: on with compiled layers (the fast path), off with eager ones or with the switch off.
    assert mem.estimate_memory(cfg, LLAMA7B, checkpointed_layers=32).graphs
    cfg.train.cuda_graphs = False
    assert not mem.estimate_memory(cfg, LLAMA7B, checkpointed_layers=32).graphs


@pytest.mark.parametrize(("dropout", "peer_peak"), [(0.1, 7.00), (0.0, 6.80)])
def test_fit_at_the_peers_memory_takes_a_graphed_plan(dropout: float, peer_peak: float) -> None:
    cfg = bench_cfg(2048, dropout, compiled=True)
    budget = int(peer_peak * mem.GIB)
    plan = mem.fit_checkpointing(cfg, LLAMA7B, budget)
    # Measured on an H200: 30/32 graphed, paged optimizer, 6.63 GiB at both dropouts (the peer:
    # 7.00 and 6.80), 2.95x and 3.11x the peer's tokens/s (bench/RESULTS.md, session 5).
    assert plan.graphs and not plan.offload and plan.total <= 0.97 * budget
    assert plan.checkpointed_layers == 30 and not plan.optimizer_on_device
    without = mem.fit_checkpointing(cfg, LLAMA7B, budget, graphs=False)
    assert not without.graphs and without.total <= 0.97 * budget
    # Below every graphed plan that keeps inputs on the device: all graphed, inputs on the host.
    lean = mem.fit_checkpointing(cfg, LLAMA7B, int(6.0 * mem.GIB), graphed_offload=True)
    assert (
        lean.graphs and lean.offload and lean.checkpointed_layers == 32 and lean.total <= 0.97 * 6 * mem.GIB
    )
    assert not mem.fit_checkpointing(cfg, LLAMA7B, int(6.0 * mem.GIB), graphed_offload=False).graphs
    # Nothing graphed fits: the low-memory plan is unchanged.
    low = mem.fit_checkpointing(cfg, LLAMA7B, int(5.4 * mem.GIB))
    assert low.offload and not low.graphs
