"""A small transformer text classifier, trained the usual way: dict batches, padding, a keyword forward.

The data set is generated (no download): token sequences of varying length over a 200-word vocabulary; a review is
positive when it holds more "good" tokens (10-29) than "bad" ones (30-49).

    python examples/text_dict/text_classifier.py            # trains 3 epochs and prints the validation accuracy
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

VOCAB, PAD = 200, 0


class SyntheticReviews(Dataset):
    """Items are ``{"input_ids": LongTensor(length), "label": int}`` with lengths from 8 to 96 tokens."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(n):
            length = int(torch.randint(8, 97, (1,), generator=g))
            ids = torch.randint(50, VOCAB, (length,), generator=g)
            k = int(torch.randint(1, max(2, length // 4), (1,), generator=g))
            good = int(torch.rand((), generator=g) < 0.5)
            pos = torch.randperm(length, generator=g)[: 2 * k + 1]
            ids[pos[: k + good]] = torch.randint(10, 30, (k + good,), generator=g)
            ids[pos[k + good : 2 * k + 1]] = torch.randint(30, 50, (k + 1 - good,), generator=g)
            self.items.append({"input_ids": ids, "label": good})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def pad_collate(items: list[dict]) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence of the batch; the mask marks real tokens."""
    ids = nn.utils.rnn.pad_sequence([it["input_ids"] for it in items], batch_first=True, padding_value=PAD)
    return {"input_ids": ids, "attention_mask": (ids != PAD).long(),
            "labels": torch.tensor([it["label"] for it in items])}


class TextClassifier(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 2, layers: int = 2, max_len: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim, padding_idx=PAD)
        self.pos = nn.Parameter(torch.zeros(max_len, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids) + self.pos[: input_ids.shape[1]]  # (B, T, C)
        x = self.encoder(x, src_key_padding_mask=attention_mask == 0)
        mask = attention_mask.unsqueeze(-1).float()
        return self.head((x * mask).sum(1) / mask.sum(1))  # masked mean over tokens -> (B, 2)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(-1) == labels).float().mean()


def make_datasets(num_samples: int = 4000) -> tuple[SyntheticReviews, SyntheticReviews]:
    return SyntheticReviews(num_samples, seed=0), SyntheticReviews(max(64, num_samples // 4), seed=1)


def main(epochs: int = 3, batch_size: int = 32, lr: float = 1e-3) -> None:
    torch.manual_seed(0)
    train, val = make_datasets()
    train_loader = DataLoader(train, batch_size=batch_size, shuffle=True, collate_fn=pad_collate)
    val_loader = DataLoader(val, batch_size=256, collate_fn=pad_collate)
    model = TextClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for epoch in range(epochs):
        model.train()
        for batch in train_loader:
            logits = model(batch["input_ids"], batch["attention_mask"])
            loss = F.cross_entropy(logits, batch["labels"])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            acc = sum(float(accuracy(model(b["input_ids"], b["attention_mask"]), b["labels"])) * len(b["labels"])
                      for b in val_loader) / len(val)
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}  val accuracy {acc:.3f}")


if __name__ == "__main__":
    main()
