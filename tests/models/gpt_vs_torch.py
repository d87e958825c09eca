#!/usr/bin/env python3
"""gpt_vs_torch: resync's gpt against the same model in PyTorch, with the same weights and batch.

gpt_dump (tests/models/gpt_dump.cpp) writes a seeded gpt's initial parameters, a batch of byte
tokens, and resync's logits, mean loss and gradient; this script loads the parameters into a
PyTorch GPT-2 (nn.Linear, F.layer_norm, gelu(approximate="tanh"), causal softmax attention,
tied output), runs the batch and compares, in float32 on the CPU:
  logits:   max |ours - torch| <= 2e-6 (logits are O(1); seen: 2.4e-7)
  loss:     |ours - torch| <= 1e-6 * |torch|
  gradient: for every parameter tensor, max |ours - torch| <= 1e-5 * max |torch| + 1e-8
            (seen: about 1e-6 * max |torch|)
Exits 77 ("skipped", printed) where `import torch` fails.

Usage: gpt_vs_torch.py GPT_DUMP_BINARY WORK_DIR
"""
import os
import subprocess
import sys

try:
    import numpy as np
    import torch
    import torch.nn.functional as F
except ImportError as e:
    # Debian's python3-torch lives in the system interpreter; a pyenv/venv python3 first on the
    # PATH does not see it.
    if os.path.realpath(sys.executable) != os.path.realpath("/usr/bin/python3") and \
            os.path.exists("/usr/bin/python3") and not os.environ.get("RESYNC_TORCH_REEXEC"):
        os.environ["RESYNC_TORCH_REEXEC"] = "1"
        os.execv("/usr/bin/python3", ["/usr/bin/python3"] + sys.argv)
    print(f"SKIPPED: PyTorch is not importable ({e}); scripts/setup.sh installs python3-torch")
    sys.exit(77)

DUMP, WORK = sys.argv[1], sys.argv[2]
SHAPES = [  # L H C T V B seed
    (2, 4, 32, 16, 256, 3, 7),
    (1, 1, 8, 5, 11, 2, 3),
    (3, 2, 48, 24, 256, 2, 11),
    (1, 2, 16, 70, 256, 2, 5),  # T past a multiple of the CPU attention's 16-wide vectors
    (2, 2, 64, 36, 256, 2, 13),  # head size 32 (two whole vectors), as in the default gpt,
    (1, 2, 64, 37, 256, 1, 17),  # with T a multiple of the CPU attention's 4-row blocks or not
]
LOGIT_TOL, LOSS_RTOL, GRAD_RTOL, GRAD_ATOL = 2e-6, 1e-6, 1e-5, 1e-8


def layout(L, C, T, V):
    """Names and shapes of the parameters in resync's buffer order (models/gpt.h)."""
    out = [("wte", (V, C)), ("wpe", (T, C))]
    for l in range(L):
        out += [(f"h{l}.ln1_w", (C,)), (f"h{l}.ln1_b", (C,)),
                (f"h{l}.qkv_w", (3 * C, C)), (f"h{l}.qkv_b", (3 * C,)),
                (f"h{l}.proj_w", (C, C)), (f"h{l}.proj_b", (C,)),
                (f"h{l}.ln2_w", (C,)), (f"h{l}.ln2_b", (C,)),
                (f"h{l}.fc_w", (4 * C, C)), (f"h{l}.fc_b", (4 * C,)),
                (f"h{l}.fcproj_w", (C, 4 * C)), (f"h{l}.fcproj_b", (C,))]
    out += [("lnf_w", (C,)), ("lnf_b", (C,))]
    return out


def split(flat, names_shapes):
    tensors, at = {}, 0
    for name, shape in names_shapes:
        n = int(np.prod(shape))
        tensors[name] = flat[at:at + n].reshape(shape)
        at += n
    assert at == flat.size, f"layout covers {at} of {flat.size} parameters"
    return tensors


def forward(p, x, L, H, C, T, V):
    B = x.shape[0]
    pos = torch.arange(T)
    h = p["wte"][x] + p["wpe"][pos]
    hs = C // H
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for l in range(L):
        a = F.layer_norm(h, (C,), p[f"h{l}.ln1_w"], p[f"h{l}.ln1_b"], eps=1e-5)
        qkv = F.linear(a, p[f"h{l}.qkv_w"], p[f"h{l}.qkv_b"])
        q, k, v = qkv.split(C, dim=2)
        q = q.view(B, T, H, hs).transpose(1, 2)
        k = k.view(B, T, H, hs).transpose(1, 2)
        v = v.view(B, T, H, hs).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) / (hs ** 0.5)
        att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        h = h + F.linear(y, p[f"h{l}.proj_w"], p[f"h{l}.proj_b"])
        m = F.layer_norm(h, (C,), p[f"h{l}.ln2_w"], p[f"h{l}.ln2_b"], eps=1e-5)
        m = F.gelu(F.linear(m, p[f"h{l}.fc_w"], p[f"h{l}.fc_b"]), approximate="tanh")
        h = h + F.linear(m, p[f"h{l}.fcproj_w"], p[f"h{l}.fcproj_b"])
    h = F.layer_norm(h, (C,), p["lnf_w"], p["lnf_b"], eps=1e-5)
    return h @ p["wte"].T


def check(L, H, C, T, V, B, seed):
    out = os.path.join(WORK, f"gpt_{L}_{H}_{C}_{T}_{V}_{B}")
    os.makedirs(out, exist_ok=True)
    subprocess.run([DUMP, out] + [str(v) for v in (L, H, C, T, V, B, seed)], check=True)
    read = lambda name, dt: np.fromfile(os.path.join(out, name), dtype=dt)
    names = layout(L, C, T, V)
    params = split(read("params.f32", np.float32), names)
    ours_grads = split(read("grads.f32", np.float32), names)
    x = torch.from_numpy(read("x.f32", np.float32).astype(np.int64).reshape(B, T))
    y = torch.from_numpy(read("y.i32", np.int32).astype(np.int64).reshape(B, T))
    ours_logits = read("logits.f32", np.float32).reshape(B, T, V)
    ours_loss = float(read("loss.f32", np.float32)[0])

    p = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    logits = forward(p, x, L, H, C, T, V)
    loss = F.cross_entropy(logits.view(-1, V), y.view(-1))
    loss.backward()

    what = f"L{L} H{H} C{C} T{T} V{V} B{B}"
    bad = []
    d = float(np.abs(ours_logits - logits.detach().numpy()).max())
    if not d <= LOGIT_TOL:
        bad.append(f"logits: max |diff| {d:.3g} > {LOGIT_TOL}")
    if not abs(ours_loss - loss.item()) <= LOSS_RTOL * abs(loss.item()):
        bad.append(f"loss: ours {ours_loss!r}, torch {loss.item()!r}")
    worst = 0.0
    for name, _ in names:
        ref = p[name].grad.numpy()
        diff = float(np.abs(ours_grads[name] - ref).max())
        tol = GRAD_RTOL * float(np.abs(ref).max()) + GRAD_ATOL
        worst = max(worst, diff / tol)
        if not diff <= tol:
            bad.append(f"grad {name}: max |diff| {diff:.3g} > tolerance {tol:.3g}")
    if bad:
        print(f"FAIL {what}:\n  " + "\n  ".join(bad))
        return False
    print(f"ok {what}: loss {ours_loss:.6f} (torch {loss.item():.6f}), logits max diff {d:.2e}, "
          f"worst gradient diff {worst:.2f} of its tolerance")
    return True


torch.set_num_threads(1)
results = [check(*s) for s in SHAPES]
sys.exit(0 if all(results) else 1)
