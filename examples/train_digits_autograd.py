"""Train the digits MLP of train_digits.py with HIPS autograd computing the grads.

    python examples/train_digits_autograd.py [--epochs 30]

The loss is written with autograd.numpy as a function of the model's
fastsgd.Parameters; autograd differentiates it with respect to them (fastsgd
registers Parameter with autograd when autograd.numpy is imported, before or
after fastsgd) and fastsgd.SGD steps them.  The model, optimizer, schedule
and clipping are train_digits.py's, whose hand-written backward pass this
replaces; it ends by printing the test accuracy.
"""
import argparse

import autograd.numpy as anp
import numpy as np
from autograd import value_and_grad
from tqdm import tqdm
from train_digits import MLP, load_data  # the script's directory is on sys.path

import fastsgd
from fastsgd import lr_scheduler


def cross_entropy(params, x, y):
    """The MLP's mean cross-entropy on (x, y), in autograd.numpy."""
    w1, b1, w2, b2 = params
    logits = anp.tanh(x @ w1 + b1) @ w2 + b2
    logits = logits - anp.max(logits, axis=1, keepdims=True)
    log_probs = logits - anp.log(anp.sum(anp.exp(logits), axis=1, keepdims=True))
    return -anp.mean(log_probs[np.arange(len(y)), y])


# (loss, [grad of each parameter]): plain ndarrays of the parameters' shapes and dtype
loss_and_grads = value_and_grad(cross_entropy)


def train(epochs=30, batch_size=64, lr=0.02, seed=0, progress=True):
    """Train and return (losses per step, test accuracy)."""
    x_train, x_test, y_train, y_test = load_data(seed)
    rng = np.random.default_rng(seed)
    model = MLP(rng)
    params = model.parameters()
    opt = fastsgd.SGD([{"params": model.backbone}, {"params": model.head, "lr": lr * 10}],
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
            loss, grads = loss_and_grads(params, x_train[batch], y_train[batch])
            for p, g in zip(params, grads):
                p.grad = g
            losses.append(float(loss))
            fastsgd.clip_grad_norm_(params, max_norm=5.0)
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
    args = parser.parse_args(argv)
    losses, accuracy = train(args.epochs)
    print(f"final training loss {losses[-1]:.4f}, test accuracy {accuracy:.4f}")


if __name__ == "__main__":
    main()
