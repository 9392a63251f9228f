"""Edits of an ONNX graph shared by the exporter (``exporters/onnx_backend.py``) and the QNN target's
graph preparation (``qnn_graph.py``, which runs in the target's own environment and imports only its
siblings): plain functions on an ``onnx.GraphProto``, with no import of their own."""

from __future__ import annotations


def rename_inputs(graph, mapping: dict[str, str]) -> None:
    """Point every node input named in ``mapping`` at its new name (the producers are already renamed or removed)."""
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in mapping:
                node.input[i] = mapping[name]
