"""Counter-based random numbers: a pure function of (seed, stream, index), on any device.

Every random draw in the GINC world is addressed by integers (document id, time step, ...), so a
document is the same whichever rank, worker, batch or device generates it. The mixer is
SplitMix64's finaliser on int64 tensors (multiplication wraps; right shifts are masked to be logical).
"""
from __future__ import annotations

import hashlib

import torch

_M1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_M2 = 0x94D049BB133111EB - (1 << 64)
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)


def stream_key(seed: int, *names: object) -> int:
    """A 62-bit key for one named stream of draws, e.g. stream_key(seed, "docs", "pretrain")."""
    text = "/".join(str(n) for n in (seed, *names)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 2


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finaliser: a bijection of int64 whose outputs look independent and uniform."""
    x = x ^ _shr(x, 30)
    x.mul_(_M1)
    x.bitwise_xor_(_shr(x, 27)).mul_(_M2)
    return x.bitwise_xor_(_shr(x, 31))


def hash_bits(key: int, a: torch.Tensor, b: torch.Tensor | int = 0) -> torch.Tensor:
    """64 random bits (int64) for each pair of counters (a, b) under `key`; broadcasting like a + b."""
    a = torch.as_tensor(a, dtype=torch.int64)
    # (mix(a) + b) * G + key, expanded so the big broadcast costs one addition
    return mix64(mix64(a * _GOLDEN + key).mul_(_GOLDEN).add_(key) + torch.as_tensor(b, dtype=torch.int64) * _GOLDEN)


def _shr32(x: torch.Tensor, bits: int) -> torch.Tensor:
    return (x >> bits) & ((1 << (32 - bits)) - 1)


def hash_bits32(key: int, seq: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """32 random bits (int32) for each (sequence, step) pair; int32 arithmetic runs several times faster.

    Each sequence gets a 32-bit key from the 64-bit mixer; steps are mixed in by a 32-bit finaliser
    (Wellons' lowbias32), which is enough for sequences shorter than 2^32 steps.
    """
    seq_key = _shr(mix64(torch.as_tensor(seq, dtype=torch.int64) * _GOLDEN + key), 32).to(torch.int32)
    x = seq_key + torch.as_tensor(step, dtype=torch.int32) * (0x9E3779B9 - (1 << 32))
    x = x ^ _shr32(x, 16)
    x.mul_(0x7FEB352D)
    x.bitwise_xor_(_shr32(x, 15)).mul_(0x846CA68B - (1 << 32))
    return x.bitwise_xor_(_shr32(x, 16))


def uniform(key: int, a: torch.Tensor, b: torch.Tensor | int = 0) -> torch.Tensor:
    """Uniform float64 in [0, 1) with 53 random bits, for each pair of counters (a, b)."""
    return _shr(hash_bits(key, a, b), 11).to(torch.float64) * (2.0**-53)
