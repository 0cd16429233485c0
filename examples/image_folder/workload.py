"""The glue: hand the training script in image_classifier.py to batchfit (batchfit tune -w workload.py:make)."""

import torch.nn.functional as F
from image_classifier import SmallCNN, accuracy, cosine, make_loaders, make_optimizer

from batchfit import Workload


def make(num_images: int = 2000, workers: int = 2) -> Workload:
    train, val = make_loaders(num_images, workers)  # DataLoaders: re-created per batch size, workers kept
    return Workload(name="image-folder", model_fn=SmallCNN, optimizer_fn=make_optimizer, loss_fn=F.cross_entropy,
                    train_data=train, val_data=val, metrics={"accuracy": accuracy}, lr_schedule=cosine,
                    grad_clip=1.0, base_batch_size=64, base_lr=0.05)
