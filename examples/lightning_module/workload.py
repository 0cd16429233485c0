"""The glue: hand the LightningModule and DataModule of lit_classifier.py to batchfit."""

from lit_classifier import TRAINER_ARGS, DigitsData, LitClassifier

from batchfit.integrations.lightning import lightning_workload


def make(hidden: int = 128):  # noqa: ANN201 - a batchfit Workload
    return lightning_workload(lambda: LitClassifier(hidden=hidden), datamodule=DigitsData(),
                              gradient_clip_val=TRAINER_ARGS["gradient_clip_val"],
                              accumulate_grad_batches=TRAINER_ARGS["accumulate_grad_batches"], name="lit-digits")
