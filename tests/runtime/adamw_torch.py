#!/usr/bin/env python3
"""torch.optim.AdamW on the tensors adamw_vs_torch_test.cpp wrote: N steps with the warm-up and
cosine schedule written out here again, independently of resync, and optional clipping by
torch.nn.utils.clip_grad_norm_.

Usage: adamw_torch.py INPUT OUTPUT
INPUT (little-endian): u32 n, u32 steps, f32 lr beta1 beta2 eps weight_decay grad_clip min_lr,
u32 warmup_steps total_steps (0: constant after the warm-up), f32 grad_scale, then n f32
parameters and steps x n f32 gradients.
OUTPUT: n f32 parameters, n f32 first moments, n f32 second moments after the last step.
"""
import math
import struct
import sys

import torch


def main():
    data = open(sys.argv[1], "rb").read()
    n, steps = struct.unpack_from("<II", data, 0)
    lr, beta1, beta2, eps, wd, clip, min_lr = struct.unpack_from("<7f", data, 8)
    warmup, total = struct.unpack_from("<II", data, 36)
    (grad_scale,) = struct.unpack_from("<f", data, 44)
    off = 48

    def floats(count):
        nonlocal off
        t = torch.frombuffer(bytearray(data[off:off + 4 * count]), dtype=torch.float32).clone()
        off += 4 * count
        return t

    def lr_at(step):
        if step < warmup:
            return lr * (step + 1) / warmup
        if total == 0:
            return lr
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)

    torch.set_num_threads(1)
    param = torch.nn.Parameter(floats(n))
    opt = torch.optim.AdamW([param], lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=wd)
    for step in range(steps):
        param.grad = floats(n) * grad_scale  # the averaged gradient
        if clip > 0:
            torch.nn.utils.clip_grad_norm_([param], clip)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.step()
    state = opt.state[param]
    with open(sys.argv[2], "wb") as f:
        for t in (param.detach(), state["exp_avg"], state["exp_avg_sq"]):
            f.write(struct.pack(f"<{n}f", *t.tolist()))


if __name__ == "__main__":
    main()
