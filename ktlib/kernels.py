"""Compiled CPU kernels (``ktlib/kernels.c``): attention with dropout on its weights, and dropout.

On the CPU a training step of the model is made of many small PyTorch operations; an attention call with dropout
is about a dozen of them forward and as many backward (products, softmax, the mask's random numbers, copies), each
a pass over the (B, H, T, S) scores.  The kernels do a head's rows in one pass each way, in the CPU's cache, and
draw dropout's random numbers from a counter-based hash inside the pass, so the backward pass recomputes the mask
instead of reading it (docs/benchmark.md has the figures).  They compute the same functions as the PyTorch paths of
:mod:`ktlib.layers` (``tests/test_kernels.py`` compares them): the same dropout rate (p to 2**-16) at the same
places, with random numbers from another stream; the same seed gives the same run.

They are built on first use with the machine's C compiler (``$CC``, else ``cc``) into a cache
(``$KTLIB_KERNEL_CACHE``, else ``~/.cache/ktlib/kernels``), once per source, compiler and flags, under a file lock
so that concurrent workers build it once.  Without a compiler (or OpenMP), or with ``KTLIB_KERNELS=0``, ktlib uses
its PyTorch paths; :func:`status` says which and why.  CUDA never uses them.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("kernels.c")
MAX_DK = 64  # head sizes up to this (MAX_DK in kernels.c)
_FLAGS = ["-O3", "-shared", "-fPIC", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-fassociative-math",
          "-fno-signed-zeros", "-freciprocal-math"]

_state: dict = {}  # "lib": the loaded library or None, "why": how it was got or why not


class _View(ctypes.Structure):  # view4 in kernels.c
    _fields_ = [("p", ctypes.c_void_p), ("s0", ctypes.c_int64), ("s1", ctypes.c_int64), ("s2", ctypes.c_int64),
                ("s3", ctypes.c_int64)]


class _AttentionArgs(ctypes.Structure):  # attn_args in kernels.c
    _fields_ = [("B", ctypes.c_int), ("H", ctypes.c_int), ("T", ctypes.c_int), ("S", ctypes.c_int),
                ("DK", ctypes.c_int), ("q", _View), ("k", _View), ("v", _View), ("bias", _View),
                ("scale", ctypes.c_float), ("keep_scale", ctypes.c_float), ("drop", ctypes.c_int),
                ("cut", ctypes.c_uint32), ("k1", ctypes.c_uint32), ("k2", ctypes.c_uint32), ("n_real", ctypes.c_void_p)]


def _flags() -> list[str]:
    arch = []
    if platform.machine().lower() in ("x86_64", "amd64") and torch.backends.cpu.get_cpu_capability() != "DEFAULT":
        arch = ["-mavx2", "-mfma"]  # torch found AVX2 (or AVX-512) on this CPU
    return _FLAGS + arch


def _compiler() -> list[str] | None:
    """The C compiler's command: ``$CC`` (which may carry flags), else ``cc`` or ``gcc`` on the PATH."""
    if os.environ.get("CC"):
        return shlex.split(os.environ["CC"])
    found = shutil.which("cc") or shutil.which("gcc")
    return [found] if found else None


def cache_dir() -> Path:
    if os.environ.get("KTLIB_KERNEL_CACHE"):
        return Path(os.environ["KTLIB_KERNEL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ktlib" / "kernels"


def _build(cc: list[str], flags: list[str], target: Path) -> None:
    """Compile the source into ``target`` (a temporary file renamed into place: readers never see half a file)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([*cc, *flags, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True,
                              timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{shlex.join(cc)} failed: {(done.stderr or done.stdout).strip()[-400:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _target(cc: list[str], flags: list[str]) -> Path:
    """Where the library built from this source with this compiler (its version) and these flags lives."""
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join([*cc, *flags, version]).encode()).hexdigest()[:16]
    return cache_dir() / f"ktlib-kernels-{digest}.so"


def _load():
    if os.environ.get("KTLIB_KERNELS", "1") == "0":
        return None, "off (KTLIB_KERNELS=0): PyTorch paths"
    cc = _compiler()
    if cc is None:
        return None, "off (no C compiler; set CC): PyTorch paths"
    flags = _flags()
    try:
        target = _target(cc, flags)
    except (OSError, subprocess.SubprocessError) as err:
        return None, f"off ({shlex.join(cc)} did not run: {err}): PyTorch paths"
    try:
        from filelock import FileLock

        with FileLock(str(target) + ".lock", timeout=600):
            for attempt in (1, 2):
                if not target.exists():
                    _build(cc, flags, target)
                try:
                    lib = ctypes.CDLL(str(target))
                    break
                except OSError:  # a damaged file in the cache: build it again, once
                    if attempt == 2:
                        raise
                    target.unlink()
    except Exception as err:  # noqa: BLE001 - any failure leaves the PyTorch paths, with the reason in status()
        return None, f"off (could not build or load {target}: {err}): PyTorch paths"
    lib.attention_forward.argtypes = [_AttentionArgs, _View, ctypes.c_void_p, ctypes.c_int]
    lib.attention_backward.argtypes = [_AttentionArgs, _View, ctypes.c_void_p, _View, _View, _View, ctypes.c_int]
    lib.dropout_apply.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_float,
                                  ctypes.c_uint32, ctypes.c_uint32, ctypes.c_int]
    lib.attention_forward.restype = lib.attention_backward.restype = ctypes.c_int
    return lib, f"on ({target}, built by {shlex.join([*cc, *flags[len(_FLAGS):]])})"


def _library():
    if _state.get("off"):
        return None
    if "lib" not in _state:
        _state["lib"], _state["why"] = _load()
    return _state["lib"]


@contextlib.contextmanager
def turned_off():
    """Inside the block ktlib takes its PyTorch paths (for comparisons: ``python -m ktlib.bench --kernels``)."""
    previous = _state.get("off", False)
    _state["off"] = True
    try:
        yield
    finally:
        _state["off"] = previous


def available() -> bool:
    """Whether the kernels are built and loaded (building them on the first call)."""
    return _library() is not None


def status() -> str:
    """``on (...)`` or ``off (why): PyTorch paths``."""
    if _state.get("off"):
        return "off (turned_off()): PyTorch paths"
    _library()
    return _state["why"]


def _view(x: torch.Tensor | None) -> _View:
    if x is None:
        return _View(None, 0, 0, 0, 0)
    return _View(x.data_ptr(), *(0 if n == 1 else st for n, st in zip(x.shape, x.stride(), strict=True)))


def _keys() -> tuple[int, int]:
    """Two 32-bit keys for one call's dropout, from torch's CPU generator (so torch.manual_seed fixes them)."""
    k1, k2 = torch.randint(0, 2**32, (2,), dtype=torch.int64).tolist()
    return k1, k2


def _cut(p: float) -> int:
    return round(p * 2**16)  # dropped: the top 16 bits of the hash < cut, so p to 2**-16


def attention_fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether :func:`attention` serves these inputs (and the kernels are available); a bias made for q
    (``AttentionMask.bias(q.dtype)``) fits with them."""
    return (all(x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4 for x in (q, k, v))
            and 0 < q.shape[3] <= MAX_DK and k.shape[2] > 0 and q.numel() > 0
            and q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] < 2**32 and available())


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, p: float, scale: float, n_real):
        b, heads, t, d_k = q.shape
        s = k.shape[2]
        k1, k2 = _keys() if p > 0 else (0, 0)
        if n_real is not None:
            n_real = n_real.reshape(b).to(torch.int64).contiguous()
        args = _AttentionArgs(b, heads, t, s, d_k, _view(q), _view(k), _view(v), _view(bias), scale,
                              1.0 / (1.0 - p) if p > 0 else 1.0, int(p > 0), _cut(p), k1, k2,
                              None if n_real is None else n_real.data_ptr())
        out = q.new_empty(b, t, heads, d_k).transpose(1, 2)  # heads merged for free afterwards: (B, T, H, d_k)
        stats = q.new_empty(b * heads * t * 2)  # each row's largest score and 1 / sum of exponentials
        if _library().attention_forward(args, _view(out), stats.data_ptr(), torch.get_num_threads()) != 0:
            raise MemoryError("the attention kernel could not allocate its scratch memory")
        ctx.save_for_backward(q, k, v, bias, stats, n_real)
        ctx.args = args
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.float()  # the kernel reads float32 (a no-op when it is)
        q, k, v, bias, stats, n_real = ctx.saved_tensors
        args = ctx.args  # its pointers are those of the saved tensors, which are still alive
        b, heads, t, d_k = q.shape
        grad_q = q.new_empty(b, t, heads, d_k).transpose(1, 2)
        grad_k, grad_v = (k.new_empty(b, k.shape[2], heads, d_k).transpose(1, 2) for _ in range(2))
        if _library().attention_backward(args, _view(grad), stats.data_ptr(), _view(grad_q), _view(grad_k),
                                         _view(grad_v), torch.get_num_threads()) != 0:
            raise MemoryError("the attention kernel could not allocate its scratch memory")
        return grad_q, grad_k, grad_v, None, None, None, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, p: float,
              scale: float, n_real: torch.Tensor | None = None) -> torch.Tensor:
    """``dropout(softmax(q k^T * scale + bias), p) @ v``: (B, H, T, d_k) from q (B, H, T, d_k), k and v
    (B, H, S, d_k), bias (1|B, 1|H, 1|T, S) additive (0 or -inf) or None; any strides.  Check
    :func:`attention_fits` first.  The result is laid out as (B, T, H, d_k) in memory.

    ``n_real`` (B, 1), with no bias and T == S: causal self-attention over sequences whose real frames come first
    (:meth:`ktlib.layers.AttentionMask.causal_real_first`): row t of sample i sees keys 0..t when
    ``t < n_real[i]`` and none otherwise (a zero result); the keys a row does not see are never computed."""
    b, heads, _, d_k = q.shape
    if k.shape != v.shape or k.shape[:2] != (b, heads) or k.shape[3] != d_k:
        raise ValueError(f"attention: q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} do not match: "
                         "expected (B, H, T, d_k), (B, H, S, d_k) and (B, H, S, d_k)")
    full = (b, heads, q.shape[2], k.shape[2])
    if bias is not None and (bias.dtype != torch.float32 or bias.device.type != "cpu" or bias.dim() != 4):
        raise ValueError(f"attention: bias {bias.dtype} on {bias.device}, {bias.dim()}-d: expected float32 on the "
                         "CPU, (1|B, 1|H, 1|T, S)")
    if bias is not None and (bias.shape[3] != full[3] or any(n not in (1, m) for n, m in zip(bias.shape, full,
                                                                                             strict=True))):
        raise ValueError(f"attention: bias {tuple(bias.shape)} does not broadcast to the scores {full}")
    if n_real is not None and (bias is not None or q.shape[2] != k.shape[2]):
        raise ValueError("n_real is for causal self-attention (T == S) without a bias")
    return _Attention.apply(q, k, v, bias, p, scale, n_real)


def dropout_fits(x: torch.Tensor) -> bool:
    """Whether :func:`dropout` serves ``x`` (and the kernels are available)."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and x.numel() < 2**32 and available()


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p: float):
        x = x.contiguous()
        out = torch.empty_like(x)
        ctx.args = (_cut(p), 1.0 / (1.0 - p), *_keys())
        _library().dropout_apply(x.numel(), x.data_ptr(), out.data_ptr(), *ctx.args, torch.get_num_threads())
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.float().contiguous()
        out = torch.empty_like(grad)
        _library().dropout_apply(grad.numel(), grad.data_ptr(), out.data_ptr(), *ctx.args, torch.get_num_threads())
        return out, None


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """``x`` with each element zeroed with probability p (to 2**-16) and the others scaled by 1 / (1 - p), for
    0 < p < 1; the mask is recomputed, not stored, for the backward pass.  Check :func:`dropout_fits` first."""
    return _Dropout.apply(x, p)
