"""The glue: hand the Trainer setup of hf_classifier.py to batchfit."""

from hf_classifier import collate, datasets, model_init, training_args

from batchfit.integrations.hf import hf_workload, logits_accuracy


def make(num_samples: int = 2000):  # noqa: ANN201 - a batchfit Workload
    train, val = datasets(num_samples)
    return hf_workload(model_init, train, val, collate, args=training_args(), metrics={"accuracy": logits_accuracy})
