"""Adapters for the frameworks users already train with (each needs its optional extra).

- :mod:`batchfit.integrations.keras`: a compiled Keras 3 model (torch backend) + arrays -> a :class:`Workload`
  (``pip install 'batchfit[keras]'``).
- :mod:`batchfit.integrations.lightning`: a LightningModule (factory) + DataModule -> a :class:`Workload`, and a
  Lightning callback that sizes the batch with batchfit's finder and keeps the effective batch through gradient
  accumulation (``pip install 'batchfit[lightning]'``).
- :mod:`batchfit.integrations.hf`: Hugging Face ``model_init`` + datasets + collator + ``TrainingArguments`` -> a
  :class:`Workload`, and a ``TrainerCallback`` that sizes the per-device batch when training starts
  (``pip install 'batchfit[hf]'``).
- :mod:`batchfit.integrations.common`: what they share (no framework import).

Nothing here is imported by ``import batchfit``.
"""

__all__: list[str] = []
