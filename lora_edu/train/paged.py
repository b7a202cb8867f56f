"""A paged optimizer: Adam whose moments live off the compute device between steps.

QLoRA (Dettmers et al. 2023, arXiv 2305.14314, section 3) puts the optimizer states in
NVIDIA unified memory, which the driver pages between CPU and GPU on demand, so that a
memory spike (a long sequence, say) evicts optimizer pages to CPU RAM instead of failing
with out-of-memory. Unified memory needs a CUDA GPU; this class shows the same idea with
explicit copies that any device can run:

    between steps     m, v   live on `offload_device` (CPU RAM, pinned when CUDA is present)
    step, per param   m, v   -> p.device, Adam update, -> offload_device

Only one parameter's states are on the compute device at a time, at the cost of two
copies per state per step. The update is Adam's to the bit: the arithmetic is the same,
only where the tensors wait differs. What unified memory adds on a GPU: pages move only
under memory pressure and without code changes, at page granularity, overlapped by the
driver; here every state moves every step.
"""

from __future__ import annotations

import torch

from .adam import Adam


class PagedAdam(Adam):
    """lora_edu.Adam with its moments kept on `offload_device` between steps."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 offload_device="cpu"):
        super().__init__(params, lr=lr, betas=betas, eps=eps)
        self.offload_device = torch.device(offload_device)
        self.pin = self.offload_device.type == "cpu" and torch.cuda.is_available()
        self.bytes_paged_in = 0  # bytes copied to the compute device, over all steps
        self.peak_resident_bytes = 0  # most state bytes on the compute device at one time

    def _fetch_state(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if id(p) not in self.state:  # first step: zeros, created where they will wait
            # (each made by torch.zeros: a clone of a pinned tensor is not pinned)
            self.state[id(p)] = tuple(torch.zeros(p.shape, dtype=p.dtype, device=self.offload_device,
                                                  pin_memory=self.pin) for _ in range(2))
        m, v = (s.to(p.device, non_blocking=True) for s in self.state[id(p)])
        resident = m.nbytes + v.nbytes
        self.bytes_paged_in += resident
        self.peak_resident_bytes = max(self.peak_resident_bytes, resident)
        return m, v

    def _store_state(self, p: torch.Tensor, m: torch.Tensor, v: torch.Tensor) -> None:
        home_m, home_v = self.state[id(p)]
        home_m.copy_(m)  # back to offload_device; when that is p.device, m is home_m already
        home_v.copy_(v)

    def state_bytes(self) -> int:
        """Bytes of optimizer state held on the offload device (8 per fp32 parameter)."""
        return sum(m.nbytes + v.nbytes for m, v in self.state.values())
