"""An image-folder classifier trained the usual way: image files decoded lazily with augmentation in DataLoader
workers, SGD with a cosine schedule and gradient clipping.

The images are generated once (no download) into a folder per class, as PNG files (``.npy`` when Pillow is not
installed): noisy 32x32 pictures of a disc, a square, a cross or a ring, in random colours, sizes and places.
They are written to ``$BATCHFIT_EXAMPLE_DATA`` (default: ``<temp dir>/batchfit-example-images``) at first use.

    python examples/image_folder/image_classifier.py        # trains 5 epochs and prints the validation accuracy
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

try:
    from PIL import Image
except ImportError:  # pragma: no cover - without Pillow the files are .npy arrays
    Image = None

CLASSES = ("disc", "square", "cross", "ring")
SIZE = 32


def _draw(kind: str, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    r = rng.uniform(6, 12)
    cy, cx = rng.uniform(r, SIZE - r, size=2)
    d = np.hypot(yy - cy, xx - cx)
    if kind == "disc":
        mask = d < r
    elif kind == "square":
        mask = (abs(yy - cy) < r * 0.8) & (abs(xx - cx) < r * 0.8)
    elif kind == "cross":
        mask = ((abs(yy - cy) < r / 4) & (abs(xx - cx) < r)) | ((abs(xx - cx) < r / 4) & (abs(yy - cy) < r))
    else:
        mask = (d < r) & (d > r * 0.6)
    img = rng.uniform(0, 80, size=(SIZE, SIZE, 3))
    img[mask] = rng.uniform(120, 255, size=3)
    return np.clip(img + rng.normal(0, 20, size=img.shape), 0, 255).astype(np.uint8)


def image_folder(num_images: int, root: str | os.PathLike | None = None) -> Path:
    """``root/<split>/<class>/<i>.png`` with ``num_images`` training images (a quarter as many for validation);
    written once (to a temporary folder first, then renamed, so concurrent first uses do not collide)."""
    base = Path(root or os.environ.get("BATCHFIT_EXAMPLE_DATA") or Path(tempfile.gettempdir()) /
                "batchfit-example-images")
    ext = "png" if Image is not None else "npy"
    folder = base / f"shapes-{num_images}-{ext}"
    if folder.is_dir():
        return folder
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=base))
    rng = np.random.default_rng(0)
    for split, n in (("train", num_images), ("val", max(len(CLASSES), num_images // 4))):
        for i in range(n):
            kind = CLASSES[i % len(CLASSES)]
            (tmp / split / kind).mkdir(parents=True, exist_ok=True)
            img = _draw(kind, rng)
            path = tmp / split / kind / f"{i}.{ext}"
            Image.fromarray(img).save(path) if Image is not None else np.save(path, img)
    try:
        tmp.rename(folder)
    except OSError:  # another process finished first
        pass
    return folder


class ImageFolder(Dataset):
    """Files decoded on access (in the DataLoader's workers); training adds a random flip and a padded crop."""

    def __init__(self, root: Path, augment: bool) -> None:
        self.files = sorted((p, CLASSES.index(p.parent.name)) for p in root.glob("*/*.*"))
        self.augment = augment

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.files[i]
        arr = np.asarray(Image.open(path).convert("RGB")) if path.suffix == ".png" else np.load(path)
        x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0  # (3, H, W)
        if self.augment:
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
            dy, dx = torch.randint(0, 9, (2,)).tolist()
            x = F.pad(x, (4, 4, 4, 4), mode="reflect")[:, dy : dy + SIZE, dx : dx + SIZE]
        return (x - 0.5) / 0.25, label


class SmallCNN(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, len(CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def make_loaders(num_images: int = 2000, workers: int = 2, batch_size: int = 64) -> tuple[DataLoader, DataLoader]:
    root = image_folder(num_images)
    train = DataLoader(ImageFolder(root / "train", augment=True), batch_size=batch_size, shuffle=True,
                       num_workers=workers, persistent_workers=workers > 0, pin_memory=torch.cuda.is_available())
    val = DataLoader(ImageFolder(root / "val", augment=False), batch_size=256, num_workers=workers)
    return train, val


def make_optimizer(params, lr: float) -> torch.optim.Optimizer:  # noqa: ANN001
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)


def cosine(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total_steps)))


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(-1) == labels).float().mean()


def main(epochs: int = 5, lr: float = 0.05, clip: float = 1.0) -> None:
    torch.manual_seed(0)
    train, val = make_loaders()
    model = SmallCNN()
    opt = make_optimizer(model.parameters(), lr)
    sched = cosine(opt, epochs * len(train))
    for epoch in range(epochs):
        model.train()
        for x, y in train:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            acc = sum(float(accuracy(model(x), y)) * len(y) for x, y in val) / len(val.dataset)
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}  val accuracy {acc:.3f}")


if __name__ == "__main__":
    main()
