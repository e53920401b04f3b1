"""python -m fastsgd bench: compare fastsgd with torch, the numpy reference and
the memory roofline (see fastsgd/bench.py).

python -m fastsgd report: the benchmark's JSON as tables, and the docs' tables
regenerated from it (see fastsgd/report.py).

python -m fastsgd check: train a small numpy MLP with the param-group idiom
and compare every step with fastsgd.reference and, where installed, torch."""
import argparse
import sys

import numpy as np

import fastsgd
from fastsgd import report


class MLP:
    """tanh MLP with a hand-written backward pass: backbone (W1, b1), head (W2, b2)."""

    def __init__(self, rng, n_in=20, n_hidden=64, dtype=np.float32):
        w1 = rng.standard_normal((n_in, n_hidden)) / n_in ** 0.5
        w2 = rng.standard_normal((n_hidden, 1)) / n_hidden ** 0.5
        self.backbone = [fastsgd.Parameter(w1.astype(dtype)),
                         fastsgd.Parameter(np.zeros(n_hidden, dtype))]
        self.head = [fastsgd.Parameter(w2.astype(dtype)), fastsgd.Parameter(np.zeros(1, dtype))]

    def arrays(self):
        return self.backbone + self.head

    @staticmethod
    def loss_and_grads(arrays, x, y):
        w1, b1, w2, b2 = arrays
        h = np.tanh(x @ w1 + b1)
        out = h @ w2 + b2
        err = out - y
        loss = float(np.mean(err ** 2))
        d_out = (2.0 / len(x)) * err
        d_h = (d_out @ w2.T) * (1 - h ** 2)
        grads = [x.T @ d_h, d_h.sum(0), h.T @ d_out, d_out.sum(0)]
        return loss, [g.astype(x.dtype) for g in grads]


def check(steps=50, lr=0.01):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 20)).astype(np.float32)
    y = np.sin(x[:, :1] * 2).astype(np.float32)
    models = {"fastsgd": MLP(np.random.default_rng(1)), "reference": MLP(np.random.default_rng(1))}
    optimizers = {
        "fastsgd": fastsgd.SGD([{"params": models["fastsgd"].backbone},
                                {"params": models["fastsgd"].head, "lr": lr * 10}],
                               lr=lr, momentum=0.9, weight_decay=1e-3),
        "reference": fastsgd.reference.SGD([{"params": models["reference"].backbone},
                                            {"params": models["reference"].head, "lr": lr * 10}],
                                           lr=lr, momentum=0.9, weight_decay=1e-3),
    }
    try:
        import torch
    except ImportError:
        torch = None  # type: ignore[assignment]
        print("torch is not installed: comparing with fastsgd.reference only")
    if torch is not None:
        torch_params = [torch.nn.Parameter(torch.from_numpy(np.array(p)))
                        for p in models["fastsgd"].arrays()]
        torch_opt = torch.optim.SGD([{"params": torch_params[:2]},
                                     {"params": torch_params[2:], "lr": lr * 10}],
                                    lr=lr, momentum=0.9, weight_decay=1e-3, foreach=False)

    print(f"fastsgd {fastsgd.__version__}, kernel {fastsgd.cpu_capability()}: "
          f"MLP 20-64-1, backbone lr {lr}, head lr {lr * 10}, momentum 0.9, weight decay 1e-3")
    print(f"{'step':>5} {'loss':>10}  {'vs reference':>14}  {'vs torch':>10}")
    mismatches = 0
    for step in range(1, steps + 1):
        for name, model in models.items():
            loss, grads = MLP.loss_and_grads(model.arrays(), x, y)
            for p, g in zip(model.arrays(), grads):
                p.grad = g
            optimizers[name].step()
            if name == "fastsgd":
                fast_loss, fast_grads = loss, grads
        same_ref = all(np.array_equal(a, b) for a, b in
                       zip(models["fastsgd"].arrays(), models["reference"].arrays()))
        same_torch = None
        if torch is not None:
            for tp, g in zip(torch_params, fast_grads):
                tp.grad = torch.from_numpy(g)
            torch_opt.step()
            same_torch = all(np.array_equal(a, tp.detach().numpy()) for a, tp in
                             zip(models["fastsgd"].arrays(), torch_params))
        mismatches += (not same_ref) + (same_torch is False)
        if step == 1 or step % 10 == 0 or not same_ref or same_torch is False:
            print(f"{step:>5} {fast_loss:>10.6f}  {_verdict(same_ref):>14}  {_verdict(same_torch):>10}")
    if mismatches:
        print(f"FAILED: {mismatches} step(s) differ")
        return 1
    print(f"OK: {steps} steps bit-identical to the reference" +
          (" and to torch" if torch is not None else ""))
    return 0


def _verdict(same):
    return "n/a" if same is None else ("identical" if same else "DIFFERENT")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastsgd")
    commands = parser.add_subparsers(dest="command", required=True)
    check_cmd = commands.add_parser("check", help="train a small model, compare every step")
    check_cmd.add_argument("--steps", type=int, default=50)
    bench_cmd = commands.add_parser("bench", help="time fastsgd against its peers")
    bench_cmd.add_argument("--workloads", nargs="+", metavar="W",
                           help="W1 ... W6, H1 ... H4, M1, M2, T1, T2 (default: all)")
    bench_cmd.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    bench_cmd.add_argument("--peers", nargs="+", metavar="PEER",
                           help="fastsgd, roofline, 'roofline reading objects', "
                                "'torch for-loop', 'torch foreach', 'torch fused', reference, "
                                "'fastsgd f32', 'torch chain', 'fastsgd on numpy', "
                                "'fastsgd on 4 KiB pages', \"fastsgd on numpy in torch's step\", "
                                "'torch API floor' (default: all)")
    bench_cmd.add_argument("--budget", type=float, default=0.5,
                           help="seconds of timing per measurement (default 0.5)")
    bench_cmd.add_argument("--json", default="fastsgd-bench.json",
                           help="where to write the results ('' for nowhere)")
    bench_cmd.add_argument("--label", default="",
                           help="what this run is, recorded in the JSON and shown with the "
                                "tables generated from it (e.g. 'reduced run')")
    bench_cmd.add_argument("--png", help="also draw a chart there (needs matplotlib: "
                                         "pip install 'fastsgd[plot]')")
    bench_cmd.add_argument("--cache", choices=["cold", "warm"],
                           help="the state every sample starts from: cold flushes the "
                                "cache, as after a backward pass; warm runs the same peer's "
                                "step once before, as back-to-back steps do (default: warm "
                                "for W4, which measures call overhead, cold for the rest)")
    report_cmd = commands.add_parser("report", help="a benchmark's JSON as tables; with "
                                                    "--docs, rewrite the docs' tables from it")
    report_cmd.add_argument("json", nargs="?", default=report.DEFAULT_JSON,
                            help="what the bench command wrote (default: the one the docs "
                                 f"are made from, {report.DEFAULT_JSON})")
    report_cmd.add_argument("--docs", action="store_true",
                            help="rewrite the generated regions of README.md and "
                                 "docs/performance.md (run from the repository's root)")
    report_cmd.add_argument("--check", action="store_true",
                            help="exit 1 if those regions are not what the JSON generates")
    report_cmd.add_argument("--root", default=".", help="the repository (default: here)")
    args = parser.parse_args(argv)
    if args.command == "check":
        return check(steps=args.steps)
    if args.command == "report":
        return report.main(args.json, docs=args.docs, check=args.check, root=args.root)
    from . import bench

    return bench.main(args.workloads, tuple(args.threads), args.budget, args.json, args.peers,
                      args.png, args.cache, args.label)


if __name__ == "__main__":
    sys.exit(main())
