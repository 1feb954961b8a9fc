"""``amp: auto`` (pspnet.precision): bf16 autocast where the device runs it fast, fp32 elsewhere; explicit modes
pass through; a bad value is a clear error."""

from __future__ import annotations

import pytest
import torch

from pspnet.config import TrainConfig
from pspnet.precision import autocast, grad_scaler, resolve_amp

CPU = torch.device("cpu")


def _cpu_features(monkeypatch, amx: bool, avx512_bf16: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)


@pytest.mark.parametrize("amx,avx512_bf16,expected,feature", [(True, True, "bf16", "AMX"),
                                                               (False, True, "bf16", "AVX512-BF16"),
                                                               (False, False, "none", "without")])
def test_auto_on_cpu_follows_the_bf16_features(monkeypatch, amx, avx512_bf16, expected, feature):
    _cpu_features(monkeypatch, amx, avx512_bf16)
    amp, reason = resolve_amp("auto", CPU)
    assert amp == expected and feature in reason and reason.startswith("auto")


@pytest.mark.parametrize("capability,expected", [((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 5), "none")])
def test_auto_on_cuda_needs_bf16_tensor_cores(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    amp, reason = resolve_amp("auto", torch.device("cuda", 0))
    assert amp == expected and f"sm_{capability[0]}{capability[1]}" in reason


def test_auto_elsewhere_is_fp32():
    assert resolve_amp("auto", torch.device("meta"))[0] == "none"


@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
def test_explicit_modes_pass_through(monkeypatch, amp):
    _cpu_features(monkeypatch, False, False)
    assert resolve_amp(amp, CPU) == (amp, "set by the config")


def test_bad_value_names_the_key():
    with pytest.raises(ValueError, match="config key 'amp'.*got 'int8'"):
        resolve_amp("int8", CPU)


def test_auto_is_the_config_default():
    assert TrainConfig().amp == "auto"


def test_autocast_and_scaler_follow_the_resolved_mode():
    with autocast(CPU, "bf16"):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast(CPU, "none"):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float32
    assert grad_scaler(CPU, "fp16") is not None and grad_scaler(CPU, "bf16") is None
