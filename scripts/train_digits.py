"""Train the built-in digits model and write its weights to eqcore/assets/digits.pt.

Deterministic: fixed seeds, one thread, deterministic algorithms, and the shared split from
``eqcore.models.digits_data.digits_split`` (so the held-out test digits are the ones the tests and plugin use).
Inputs are pixel/16 then normalized with the digits InputSpec's fixed mean/std; augmentation is a
random shift of up to one pixel. Prints the held-out float accuracy; refuses to save below 97%.

    python scripts/train_digits.py [--epochs 60] [--output eqcore/assets/digits.pt]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from eqcore.models.digits_data import digits_split
from eqcore.models.digits_net import DigitsNet
from eqcore.models.specs import digits_spec

MIN_ACCURACY = 0.97
DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "eqcore" / "assets" / "digits.pt"


def normalize(x: torch.Tensor) -> torch.Tensor:
    spec = digits_spec()
    return (x - spec.mean[0]) / spec.std[0]


def random_shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by -1..1 pixels in x and y (zero fill), drawn from ``generator``."""
    padded = F.pad(x, (1, 1, 1, 1))
    offsets = torch.randint(0, 3, (x.shape[0], 2), generator=generator)
    return torch.stack([padded[i, :, dy : dy + 8, dx : dx + 8] for i, (dy, dx) in enumerate(offsets.tolist())])


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(normalize(x)).argmax(1) == y).double().mean().item()


def train(*, epochs: int, batch_size: int, lr: float, seed: int) -> tuple[DigitsNet, float, float]:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    split = digits_split()
    x_train, y_train = torch.from_numpy(split.x_train.copy()), torch.from_numpy(split.y_train.copy())
    x_test, y_test = torch.from_numpy(split.x_test.copy()), torch.from_numpy(split.y_test.copy())

    model = DigitsNet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    steps_per_epoch = -(-len(y_train) // batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(y_train), generator=generator)
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            inputs = normalize(random_shift(x_train[batch], generator))
            loss = F.cross_entropy(model(inputs), y_train[batch], label_smoothing=0.05)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    return model.eval(), accuracy(model, x_train, y_train), accuracy(model, x_test, y_test)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    start = time.perf_counter()
    model, train_acc, test_acc = train(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    elapsed = time.perf_counter() - start
    n_params = sum(p.numel() for p in model.parameters())
    print(f"digits: {n_params} parameters, {args.epochs} epochs in {elapsed:.1f} s")
    print(f"train accuracy {train_acc:.4f}, held-out test accuracy {test_acc:.4f} (float32)")
    if test_acc < MIN_ACCURACY:
        print(f"test accuracy below {MIN_ACCURACY:.2f}; weights not saved", file=sys.stderr)
        return 1
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, args.output)
    print(f"saved {args.output} ({args.output.stat().st_size / 1024:.1f} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
