"""Attention of the ExecuTorch program: ExecuTorch's LLM kernels, or transformers' own ops.

``custom-ops`` (the default): each layer's static KV cache is written by ``llama::update_cache``
and attention runs in ``llama::custom_sdpa``, the kernels of ExecuTorch's LLM runner
(``executorch.extension.llm.custom_ops``). ``custom_sdpa`` reads only the filled cache positions
(``start_pos + seq_len``), applies the causal mask itself and maps each query head to its KV head
(grouped-query attention) without copying the cache. Transformers' own static cache and SDPA
(``portable``) lower to a cache write (``index_put``), a mask (``where``) and a GQA repeat
(``expand_copy``) over every cache position; none of them is delegated to XNNPACK, so they cost
more than the quantised matmuls at decode time (benchmarks/results/vs_optimum_et_profile.md).

``portable`` stays available for runtimes built without the LLM custom-ops kernels: a program of
``custom-ops`` attention needs them registered before it loads (:func:`register_custom_ops`).

The two parts meet through transformers' ``AttentionInterface``: :class:`OpLayoutLayer` (one per
decoder layer, replacing the ``StaticLayer`` of ``TorchExportableModuleWithStaticCache``) keeps the
cache in the ops' layout ``[batch, position, kv_head, head_dim]`` and returns it as is, and
:func:`custom_op_attention` (registered as :data:`ATTENTION_NAME`) passes it to ``custom_sdpa``
unchanged. The layer's ``update`` therefore returns the cache in a layout only this attention
function reads: the two are installed together (:func:`use_custom_ops`) and never apart.
"""

from __future__ import annotations

import torch
from torch import nn

ATTENTIONS = {
    "custom-ops": "ExecuTorch's llama::update_cache and llama::custom_sdpa kernels (needs a runtime with the LLM custom ops)",
    "portable": "transformers' static cache and SDPA as standard aten ops (any ExecuTorch runtime; slower decode)",
}
DEFAULT_ATTENTION = "custom-ops"
ATTENTION_NAME = "hydraopt_et_custom_ops"  # the name under transformers' AttentionInterface


def register_custom_ops() -> None:
    """Register ExecuTorch's ``llama::`` ops (PyTorch side for export, and their ExecuTorch kernels
    for the runtime): importing ExecuTorch's module loads its ``libcustom_ops_aot_lib``."""
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401


def _start(position: torch.Tensor) -> int:
    """First position of this call as a (symbolic) int, bounded for export."""
    start = position.item()
    torch._check(start >= 0)
    return start


def custom_op_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, scaling: float | None = None,
                        position_ids: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """``AttentionInterface`` function: ``query`` ``[B, heads, S, D]`` as transformers passes it;
    ``key``/``value`` the whole cache of the layer in the ops' layout (:class:`OpLayoutLayer`).
    Causal from the first position of ``position_ids``; the transformers mask is not built
    (:func:`_no_mask`). Returns ``[B, S, heads, D]``, as transformers' attention functions do."""
    if position_ids is None:
        raise ValueError("custom_op_attention needs position_ids (the causal start position)")
    out = torch.ops.llama.custom_sdpa(query.transpose(1, 2), key, value, _start(position_ids[0, 0]),
                                      None, 0.0, True, scaling)
    return out, None


def _no_mask(*args, **kwargs) -> None:
    """``AttentionMaskInterface`` function: no mask tensor (``custom_sdpa`` masks causally itself)."""
    return None


def _layer_class():
    from transformers.cache_utils import StaticLayer

    class OpLayoutLayer(StaticLayer):
        """A ``StaticLayer`` whose keys and values are ``[B, max_cache_len, kv_heads, D]`` and are
        written by ``llama::update_cache`` at the layer's ``cumulative_length``."""

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            super().lazy_initialization(key_states, value_states)
            self.keys = self.keys.transpose(1, 2).contiguous()
            self.values = self.values.transpose(1, 2).contiguous()

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            start = _start(self.cumulative_length)
            torch.ops.llama.update_cache(key_states.transpose(1, 2), self.keys, start)
            torch.ops.llama.update_cache(value_states.transpose(1, 2), self.values, start)
            self.cumulative_length.add_(key_states.shape[-2])
            return self.keys, self.values  # the ops' layout: read by custom_op_attention only

    return OpLayoutLayer


def use_custom_ops(exportable: nn.Module) -> None:
    """Switch a ``TorchExportableModuleWithStaticCache`` (already built) to ``custom-ops``
    attention: its cache layers become :class:`OpLayoutLayer` (re-registered as the module's
    buffers under the same names) and its model's attention :func:`custom_op_attention`."""
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    register_custom_ops()
    AttentionInterface.register(ATTENTION_NAME, custom_op_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, _no_mask)
    layer_class = _layer_class()
    cache = exportable.static_cache
    for i, old in enumerate(cache.layers):
        layer = layer_class(old.max_cache_len)
        layer.lazy_initialization(old.keys, old.values)  # reads batch, heads and head_dim from them
        cache.layers[i] = layer
        exportable.register_buffer(f"key_cache_{i}", layer.keys, persistent=False)
        exportable.register_buffer(f"value_cache_{i}", layer.values, persistent=False)
        exportable.register_buffer(f"cumulative_length_{i}", layer.cumulative_length, persistent=False)
    exportable.model.config._attn_implementation = ATTENTION_NAME
