"""A real training run, eager and fused: a 64-300-100-10 relu MLP with cross-entropy on scikit-learn's digits
(1797 8x8 images of the digits 0-9, shipped with scikit-learn: nothing to download).

The fused model is fusedlayers.fuse() of the eager one, so both start from the same weights; both see the
same batches in the same order, and their epochs alternate (which one goes first alternates too), so that the
machine's noise falls on both alike. Prints each epoch's times and losses, then the test accuracy of both,
their median time per epoch and its ratio.

    python examples/digits.py [--epochs 30] [--batch-size 32] [--lr 0.05] [--seed 0] [--threads N]
"""
import argparse
import statistics
import time

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import fusedlayers


class Classifier(nn.Module):
    """The network and its loss in one module, so that fuse() converts both."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))
        self.loss = nn.CrossEntropyLoss()

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.net(images)
        return logits, self.loss(logits, labels)


def load(seed: int):
    """Train and test splits (3:1, stratified), pixels scaled from 0..16 to 0..1."""
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(digits.data, digits.target, test_size=0.25,
                                                        random_state=seed, stratify=digits.target)
    as_images = lambda a: torch.tensor(a, dtype=torch.float32) / 16  # noqa: E731
    return as_images(x_train), torch.tensor(y_train), as_images(x_test), torch.tensor(y_test)


def train_epoch(model, optimizer, x, y, order, batch_size) -> float:
    """One pass over the batches in `order`; returns the mean training loss."""
    model.train()
    total = 0.0
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        _, loss = model(x[idx], y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(idx)
    return total / len(order)


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    logits, _ = model(x, y)
    return (logits.argmax(1) == y).double().mean().item()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    x_train, y_train, x_test, y_test = load(args.seed)
    torch.manual_seed(args.seed)
    models = {"eager": Classifier()}
    models["fused"] = fusedlayers.fuse(models["eager"])  # a copy: the same initial weights
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=args.lr, momentum=0.9) for name, m in models.items()}
    shuffle = torch.Generator().manual_seed(args.seed)
    times = {name: [] for name in models}
    print(f"digits: {len(x_train)} training and {len(x_test)} test images; {args.epochs} epochs, batch "
          f"{args.batch_size}, {torch.get_num_threads()} threads")
    print(f"{'epoch':>5}  {'eager ms':>9}  {'fused ms':>9}  {'eager loss':>10}  {'fused loss':>10}")
    for epoch in range(args.epochs):
        order = torch.randperm(len(x_train), generator=shuffle)
        losses = {}
        for name in (("eager", "fused") if epoch % 2 == 0 else ("fused", "eager")):
            start = time.perf_counter()
            losses[name] = train_epoch(models[name], optimizers[name], x_train, y_train, order, args.batch_size)
            times[name].append(time.perf_counter() - start)
        print(f"{epoch + 1:>5}  {1e3 * times['eager'][-1]:>9.1f}  {1e3 * times['fused'][-1]:>9.1f}  "
              f"{losses['eager']:>10.5f}  {losses['fused']:>10.5f}")

    result = {name: {"accuracy": accuracy(m, x_test, y_test),
                     "epoch_ms": 1e3 * statistics.median(times[name][1:] or times[name])}  # epoch 1 warms up
              for name, m in models.items()}
    drift = max((p - q).abs().max().item()
                for p, q in zip(models["eager"].parameters(), models["fused"].parameters()))
    for name, r in result.items():
        print(f"{name}: test accuracy {r['accuracy']:.4f}, median {r['epoch_ms']:.1f} ms per epoch")
    print(f"fused speedup (eager / fused time per epoch): {result['eager']['epoch_ms'] / result['fused']['epoch_ms']:.2f}x;"
          f" largest parameter difference after training: {drift:.2e}")
    return result


if __name__ == "__main__":
    main()
