"""The glue: hand the training script in text_classifier.py to batchfit (batchfit tune -w workload.py:make)."""

import torch
import torch.nn.functional as F
from text_classifier import TextClassifier, accuracy, make_datasets, pad_collate

from batchfit import Workload


def make(num_samples: int = 4000) -> Workload:
    train, val = make_datasets(num_samples)
    return Workload(name="text-dict", model_fn=TextClassifier, optimizer_fn=lambda p, lr: torch.optim.AdamW(p, lr=lr),
                    loss_fn=F.cross_entropy, train_data=train, val_data=val, collate_fn=pad_collate,
                    forward=("input_ids", "attention_mask"), metrics={"accuracy": accuracy},
                    base_batch_size=32, base_lr=1e-3)
