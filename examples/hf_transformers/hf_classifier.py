"""A Hugging Face sequence classifier trained with Trainer: a tiny BERT built from a config (no download), token
datasets of varying length, a padding collator.

The task: does token 7 occur in the sequence? (A labelled synthetic set; swap in your tokenized dataset.)

    python examples/hf_transformers/hf_classifier.py        # Trainer(...).train() and the evaluation accuracy
"""

from __future__ import annotations

import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

CONFIG = dict(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
              max_position_embeddings=64, num_labels=2)


def model_init() -> BertForSequenceClassification:
    return BertForSequenceClassification(BertConfig(**CONFIG))


def token_dataset(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        length = int(torch.randint(4, 48, (1,), generator=g))
        ids = torch.randint(10, 100, (length,), generator=g)
        label = int(torch.rand((), generator=g) < 0.5)
        if label:
            ids[int(torch.randint(0, length, (1,), generator=g))] = 7
        items.append({"input_ids": ids.tolist(), "label": label})
    return items


def collate(items: list[dict]) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence of the batch (what DataCollatorWithPadding does with a tokenizer)."""
    width = max(len(it["input_ids"]) for it in items)
    ids = torch.zeros(len(items), width, dtype=torch.long)
    for r, it in enumerate(items):
        ids[r, : len(it["input_ids"])] = torch.tensor(it["input_ids"])
    return {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": torch.tensor([it["label"] for it in
                                                                                           items])}


def training_args(output_dir: str | None = None) -> TrainingArguments:
    return TrainingArguments(output_dir=output_dir or "hf-output", learning_rate=1e-3,
                             per_device_train_batch_size=16, gradient_accumulation_steps=2, weight_decay=0.01,
                             max_grad_norm=1.0, lr_scheduler_type="cosine", warmup_steps=0.1, num_train_epochs=3,
                             report_to=[], save_strategy="no", use_cpu=True, logging_steps=20)


def datasets(num_samples: int = 2000) -> tuple[list[dict], list[dict]]:
    return token_dataset(num_samples, seed=0), token_dataset(max(64, num_samples // 4), seed=1)


def main() -> None:
    train, val = datasets()
    trainer = Trainer(model_init=model_init, args=training_args(), train_dataset=train, eval_dataset=val,
                      data_collator=collate,
                      compute_metrics=lambda p: {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())})
    trainer.train()
    print(trainer.evaluate())


if __name__ == "__main__":
    main()
