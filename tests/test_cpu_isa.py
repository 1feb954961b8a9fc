"""The C++ CPU kernels give the same bits whichever instruction set runs them (csrc/cpu/isa.h: AVX-512, AVX2
or the x86-64 baseline, chosen once at load; PSP_KERNELS_CPU_ISA lowers the choice)."""

import os
import subprocess
import sys

import torch

# Runs in a fresh process per instruction set (the variant is chosen when the library loads): the fused PSP
# head (pyramid pooling, reduction conv + BN + ReLU, upsample-concat, the concat-free head conv's epilogue) in
# train mode, forward and backward, and in eval mode, on odd shapes, per dtype and layout; saves every tensor.
_PROBE = """
import sys, torch, psp_kernels
torch.manual_seed(0)
results = {}
with psp_kernels.use_backend("cpp", "cpu"):
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for channels_last in (False, True):
            for n, h, w in ((2, 13, 17), (2, 5, 3), (3, 60, 60)):
                head = psp_kernels.PSPHead(48, 12, 20, bins=(1, 2, 3, 6)).to(dtype)
                x = torch.randn(n, 48, h, w, dtype=dtype)
                if channels_last:
                    head = head.to(memory_format=torch.channels_last)
                    x = x.contiguous(memory_format=torch.channels_last)
                key = f"{dtype} cl={channels_last} {n}x{h}x{w}"
                x.requires_grad_()
                out = head.train()(x)
                out.backward(torch.randn_like(out))
                results[key + " train"] = [out.detach(), x.grad] + [p.grad for p in head.parameters()]
                with torch.no_grad():
                    results[key + " eval"] = [head.eval()(x)]
torch.save(results, sys.argv[1])
"""


def _run(tmp_path, isa):
    path = tmp_path / f"{isa}.pt"
    env = dict(os.environ, PSP_KERNELS_CPU_ISA=isa)
    subprocess.run([sys.executable, "-c", _PROBE, str(path)], env=env, check=True, timeout=600)
    return torch.load(path)


def test_instruction_sets_give_the_same_bits(tmp_path):
    widest = _run(tmp_path, "native")
    for isa in ("avx2", "baseline"):
        other = _run(tmp_path, isa)
        assert other.keys() == widest.keys()
        for key, tensors in widest.items():
            for i, (a, b) in enumerate(zip(tensors, other[key])):
                assert torch.equal(a, b), f"{key}, tensor {i}: {isa} differs from the widest instruction set"
