#!/usr/bin/env python3
"""PyTorch eager's training step on the models of `resync bench step`, for the figure beside it.

Usage: torch_step.py [--model mlp|cnn|all] [--batch-size 64] [--iters 300] [--warmup 30]
                     [--device cuda] [--seed 1]

The same layers as models/mlp.cpp (784-512-512-10, ReLU) and models/cnn.cpp (conv 5x5 pad 2,
1->16, ReLU, maxpool 2x2/2, conv 5x5 pad 2, 16->32, ReLU, maxpool 2x2/2, flatten 1568, linear 128,
ReLU, linear 10), softmax cross-entropy, SGD lr 0.01 momentum 0.9 (what `resync bench step`
uses), FP32 throughout. One line per model and timing mode:

  sync     like `resync bench step`: every step copies the batch up from pinned host memory,
           runs forward + backward + SGD, and reads the loss back (one synchronisation per
           step, as resync's compute_gradients returns the loss). The like-for-like figure.
  async    the batch stays on the device and nothing is read back until the end: the most
           PyTorch eager gets from launching ahead (an upper bound, not what resync does).

TF32 is switched off (torch.backends.cuda.matmul / cudnn) since resync's cuBLAS GEMMs are FP32
(kernels/cuda/context.cpp sets CUBLAS_DEFAULT_MATH); `--tf32` runs PyTorch's defaults instead.
Output lines start with "torch " and are read by scripts/gpu/check.sh:
  torch <model> <mode> batch <B> iters <N> ms/step <x> samples/s <y> loss <z> device <name>
Exits 3 with one line when PyTorch or the device is missing.
"""
import argparse
import sys
import time


def build(model, torch):
    nn = torch.nn
    if model == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512),
                             nn.ReLU(), nn.Linear(512, 10))
    if model == "cnn":
        return nn.Sequential(nn.Conv2d(1, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2, 2),
                             nn.Conv2d(16, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2, 2),
                             nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(),
                             nn.Linear(128, 10))
    raise ValueError(f"unknown model {model}")


def measure(torch, model_name, mode, args, dev):
    torch.manual_seed(args.seed)
    net = build(model_name, torch).to(dev)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=0.0)
    loss_fn = torch.nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(args.seed)
    x_host = torch.rand(args.batch_size, 1, 28, 28, generator=g)
    y_host = torch.randint(0, 10, (args.batch_size,), generator=g)
    if dev.type == "cuda":
        x_host, y_host = x_host.pin_memory(), y_host.pin_memory()
    x_dev, y_dev = x_host.to(dev), y_host.to(dev)

    def step():
        if mode == "sync":
            x = x_host.to(dev, non_blocking=True)
            y = y_host.to(dev, non_blocking=True)
        else:
            x, y = x_dev, y_dev
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()
        return loss.item() if mode == "sync" else loss

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    for _ in range(args.warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(args.iters):
        loss = step()
    sync()
    seconds = time.perf_counter() - t0
    loss = float(loss)
    ms = seconds * 1e3 / args.iters
    sps = args.batch_size * args.iters / seconds
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"torch {model_name} {mode} batch {args.batch_size} iters {args.iters} "
          f"ms/step {ms:.4f} samples/s {sps:.1f} loss {loss:.4f} device {name}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="all", choices=["mlp", "cnn", "all"])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--tf32", action="store_true", help="PyTorch's TF32 defaults instead of FP32")
    args = ap.parse_args()
    try:
        import torch
    except ImportError as e:
        print(f"torch_step: PyTorch is not importable: {e}", flush=True)
        return 3
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("torch_step: no CUDA device visible to PyTorch", flush=True)
        return 3
    if not args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    dev = torch.device(args.device)
    print(f"# torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN "
          f"{torch.backends.cudnn.version()}, TF32 {'default' if args.tf32 else 'off'}",
          flush=True)
    for model_name in (["mlp", "cnn"] if args.model == "all" else [args.model]):
        for mode in ("sync", "async"):
            measure(torch, model_name, mode, args, dev)
    return 0


if __name__ == "__main__":
    sys.exit(main())
