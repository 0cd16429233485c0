"""Adapters for the frameworks users already train with (each needs its optional extra).

- :mod:`batchfit.integrations.keras`: a compiled Keras 3 model (torch backend) + arrays -> a :class:`Workload`
  (``pip install 'batchfit[keras]'``).
- :mod:`batchfit.integrations.lightning`: a Lightning callback that sizes the batch with batchfit's finder and
  keeps the effective batch through gradient accumulation (``pip install 'batchfit[lightning]'``).

Nothing here is imported by ``import batchfit``.
"""
