"""Train a numpy MLP on scikit-learn's digits with fastsgd.

    python examples/train_digits.py [--epochs 30] [--reference]

A 64-128-10 tanh MLP with a hand-written backward pass, trained with the
fine-tuning idiom (the backbone at lr, the head at lr * 10), momentum,
weight decay, a OneCycleLR schedule and gradient clipping; it ends by
printing the test accuracy.  --reference trains with fastsgd.reference.SGD,
the plain-numpy spec, and gives the identical loss curve.
"""
import argparse

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import fastsgd
from fastsgd import lr_scheduler, reference


def load_data(seed=0):
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    return train_test_split(x, digits.target, test_size=0.25, random_state=seed)


class MLP:
    def __init__(self, rng, sizes=(64, 128, 10)):
        n_in, n_hidden, n_out = sizes
        self.backbone = [fastsgd.Parameter(rng.normal(0, n_in ** -0.5, (n_in, n_hidden)).astype(np.float32)),
                         fastsgd.Parameter(np.zeros(n_hidden, np.float32))]
        self.head = [fastsgd.Parameter(rng.normal(0, n_hidden ** -0.5, (n_hidden, n_out)).astype(np.float32)),
                     fastsgd.Parameter(np.zeros(n_out, np.float32))]

    def parameters(self):
        return self.backbone + self.head

    def logits(self, x):
        w1, b1, w2, b2 = self.parameters()
        self.hidden = np.tanh(x @ w1 + b1)
        return self.hidden @ w2 + b2

    def loss_and_backward(self, x, y):
        """Mean cross-entropy; sets every parameter's .grad."""
        logits = self.logits(x)
        logits = logits - logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)
        loss = float(-np.log(probs[np.arange(len(y)), y]).mean())
        d_logits = probs
        d_logits[np.arange(len(y)), y] -= 1
        d_logits /= len(y)
        w1, b1, w2, b2 = self.parameters()
        d_hidden = (d_logits @ w2.T) * (1 - self.hidden ** 2)
        grads = [x.T @ d_hidden, d_hidden.sum(0), self.hidden.T @ d_logits, d_logits.sum(0)]
        for p, g in zip(self.parameters(), grads):
            p.grad = g.astype(np.float32)
        return loss


def train(epochs=30, batch_size=64, lr=0.02, use_reference=False, seed=0, progress=True):
    """Train and return (losses per step, test accuracy)."""
    x_train, x_test, y_train, y_test = load_data(seed)
    rng = np.random.default_rng(seed)
    model = MLP(rng)
    optimizer_class = reference.SGD if use_reference else fastsgd.SGD
    opt = optimizer_class([{"params": model.backbone}, {"params": model.head, "lr": lr * 10}],
                          lr=lr, momentum=0.9, weight_decay=1e-4, nesterov=True)
    steps_per_epoch = -(-len(x_train) // batch_size)
    schedule = lr_scheduler.OneCycleLR(opt, max_lr=[lr, lr * 10], epochs=epochs,
                                       steps_per_epoch=steps_per_epoch)
    losses = []
    bar = tqdm(total=epochs * steps_per_epoch, disable=not progress, desc="training")
    for _ in range(epochs):
        order = rng.permutation(len(x_train))
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            losses.append(model.loss_and_backward(x_train[batch], y_train[batch]))
            fastsgd.clip_grad_norm_(model.parameters(), max_norm=5.0)
            opt.step()
            schedule.step()
            opt.zero_grad()
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
            bar.update()
    bar.close()
    accuracy = float((model.logits(x_test).argmax(axis=1) == y_test).mean())
    return losses, accuracy


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--reference", action="store_true",
                        help="train with fastsgd.reference.SGD (numpy) instead of fastsgd.SGD")
    args = parser.parse_args(argv)
    losses, accuracy = train(args.epochs, use_reference=args.reference)
    print(f"final training loss {losses[-1]:.4f}, test accuracy {accuracy:.4f}")


if __name__ == "__main__":
    main()
