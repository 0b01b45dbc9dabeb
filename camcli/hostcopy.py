"""One copy to the host per batch: device tensors packed into one byte buffer, read back as numpy.

Every ``float(t)``, ``int(t)``, ``.item()``, ``.tolist()`` or ``.cpu()`` of a CUDA tensor waits for
the device to finish everything queued before it. Per image and per value that is hundreds of
synchronisations per batch. Instead the engine adds whatever the host will read (maps, flags,
scores, probabilities, top-k, saturation counts, target classes) to a :class:`HostPack`, which
copies them in one transfer and hands back numpy arrays that per-image code reads freely.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

_NUMPY = {
    torch.float32: np.float32,
    torch.float64: np.float64,
    torch.int64: np.int64,
    torch.int32: np.int32,
    torch.uint8: np.uint8,
    torch.bool: np.bool_,
}
_ALIGN = 8  # every part starts on an 8-byte boundary, so numpy views are aligned


class HostPack:
    """Collect device tensors with :meth:`add`, then :meth:`fetch` them all in one copy.

    ``add`` returns a handle (an index into what ``fetch`` returns). Half-precision and other
    floating tensors travel as float32; the dtypes above travel as they are, bit for bit.
    """

    def __init__(self) -> None:
        self._parts: list[Tensor] = []

    def add(self, t: Tensor) -> int:
        t = t.detach()
        if t.dtype not in _NUMPY:
            t = t.float() if t.is_floating_point() else t.long()
        self._parts.append(t)
        return len(self._parts) - 1

    def fetch(self) -> list[np.ndarray]:
        """The added tensors as numpy arrays (views of one host buffer), after one device-to-host copy."""
        if not self._parts:
            return []
        device = self._parts[0].device
        chunks: list[Tensor] = []
        layout: list[tuple[int, int, tuple[int, ...], type]] = []  # (offset, bytes, shape, numpy dtype)
        offset = 0
        for t in self._parts:
            flat = t.to(device).reshape(-1)
            if flat.numel() and flat.stride(0) != 1:  # a column slice (even of one row, which torch calls contiguous)
                flat = flat.clone(memory_format=torch.contiguous_format)
            raw = flat.view(torch.uint8) if flat.dtype != torch.uint8 else flat
            layout.append((offset, raw.numel(), tuple(t.shape), _NUMPY[t.dtype]))
            chunks.append(raw)
            pad = -raw.numel() % _ALIGN
            if pad:
                chunks.append(torch.zeros(pad, dtype=torch.uint8, device=device))
            offset += raw.numel() + pad
        buf = torch.cat(chunks)
        host = to_host(buf).numpy()
        return [host[o : o + n].view(dt).reshape(shape) for o, n, shape, dt in layout]


def to_host(t: Tensor) -> Tensor:
    """A CPU copy of ``t``: from CUDA into pinned memory without blocking, then one wait on an event."""
    if t.device.type == "cpu":
        return t
    if t.device.type == "cuda":
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(t.device))
        done.synchronize()
        return host
    return t.cpu()
