"""Train the digits MLP of train_digits.py data-parallel over MPI.

    mpiexec -n 2 python -m mpi4py examples/train_digits_distributed.py [--epochs 30]

Every rank holds the whole model and takes a slice of each batch; the
DistributedOptimizer averages the grads across ranks in rank order before
each step, so every rank steps identically (and would at any number of
ranks).  Each rank's grad is its slice's sum over the batch size times the
number of ranks, so that the average is the batch's mean even when the
slices differ in size.  Clipping sees the averaged grads.  At the end every
rank prints the same digest of its parameters, and rank 0 the test accuracy.
"""
import argparse
import hashlib

import numpy as np
from mpi4py import MPI
from tqdm import tqdm
from train_digits import MLP, load_data  # the script's directory is on sys.path

import fastsgd
import fastsgd.distributed as dist
from fastsgd import lr_scheduler


def train(epochs=30, batch_size=64, lr=0.02, seed=0, comm=MPI.COMM_WORLD):
    """Train on every rank; return (digest of the parameters, test accuracy)."""
    x_train, x_test, y_train, y_test = load_data(seed)
    rng = np.random.default_rng(seed)  # the same batches on every rank
    model = MLP(rng)
    dist.broadcast_parameters(model.parameters(), comm=comm)  # one start, whatever the seeds
    opt = dist.DistributedOptimizer(
        fastsgd.SGD([{"params": model.backbone}, {"params": model.head, "lr": lr * 10}],
                    lr=lr, momentum=0.9, weight_decay=1e-4, nesterov=True), comm=comm)
    steps_per_epoch = -(-len(x_train) // batch_size)
    schedule = lr_scheduler.OneCycleLR(opt, max_lr=[lr, lr * 10], epochs=epochs,
                                       steps_per_epoch=steps_per_epoch)
    bar = tqdm(total=epochs * steps_per_epoch, disable=comm.rank != 0, desc="training")
    for _ in range(epochs):
        order = rng.permutation(len(x_train))
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            mine = np.array_split(batch, comm.size)[comm.rank]
            if len(mine):
                loss = model.loss_and_backward(x_train[mine], y_train[mine])
                for p in model.parameters():
                    p.grad *= np.float32(len(mine) * comm.size / len(batch))
            else:  # fewer samples than ranks: this rank's share of the sum is 0
                loss = 0.0
                for p in model.parameters():
                    p.grad = np.zeros_like(p, subok=False)
            dist.clip_grad_norm_(opt, max_norm=5.0)  # averages, then clips
            opt.step()
            schedule.step()
            opt.zero_grad()
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            bar.update()
    bar.close()
    digest = hashlib.sha256(b"".join(p.tobytes() for p in model.parameters())).hexdigest()
    accuracy = float((model.logits(x_test).argmax(axis=1) == y_test).mean())
    return digest, accuracy


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args(argv)
    comm = MPI.COMM_WORLD
    digest, accuracy = train(args.epochs, comm=comm)
    print(f"rank {comm.rank} of {comm.size}: parameters digest {digest[:16]}", flush=True)
    comm.Barrier()
    if comm.rank == 0:
        print(f"test accuracy {accuracy:.4f}", flush=True)


if __name__ == "__main__":
    main()
