#!/usr/bin/env python3
"""One rank's gpt training step in PyTorch (forward, backward, SGD momentum update), the peer of
`resync bench step --model gpt`: the same model (GPT-2 pre-LN blocks, tanh GELU, tied output),
the same batch shape, float32, torch.set_num_threads(THREADS). Prints one line:
  torch tokens/s <value> ms/step <value> cpu-tokens/s <value>
(cpu-tokens/s: per second of process CPU time, comparable on a busy shared machine)

Usage: gpt_torch_step.py L H C T BATCH ITERS WARMUP THREADS
"""
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

L, H, C, T, B, ITERS, WARMUP, THREADS = (int(v) for v in sys.argv[1:9])
V = 256
torch.set_num_threads(THREADS)
torch.manual_seed(1)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.qkv, self.proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.fc, self.fcproj = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (z.view(b, t, H, C // H).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / (C // H) ** 0.5)
        att = att.masked_fill(MASK[:t, :t] == 0, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(b, t, C)
        x = x + self.proj(y)
        return x + self.fcproj(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


MASK = torch.tril(torch.ones(T, T))


class Gpt(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(V, C), nn.Embedding(T, C)
        self.blocks = nn.ModuleList(Block() for _ in range(L))
        self.lnf = nn.LayerNorm(C)

    def forward(self, idx):
        h = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for blk in self.blocks:
            h = blk(h)
        return self.lnf(h) @ self.wte.weight.T


model = Gpt()
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
x = torch.randint(0, V, (B, T))
y = torch.randint(0, V, (B, T))


def step():
    opt.zero_grad(set_to_none=False)
    loss = F.cross_entropy(model(x).view(-1, V), y.view(-1))
    loss.backward()
    opt.step()


for _ in range(WARMUP):
    step()
t0, c0 = time.perf_counter(), time.process_time()
for _ in range(ITERS):
    step()
dt = (time.perf_counter() - t0) / ITERS
dc = (time.process_time() - c0) / ITERS
print(f"torch tokens/s {B * T / dt:.1f} ms/step {dt * 1e3:.3f} cpu-tokens/s {B * T / dc:.1f}")
