"""What every adapter layer is: a frozen `base` module plus a few small trained tensors.

LoRA, DoRA, PiSSA, LoRA-GA, AdaLoRA and (IA)^3 differ in what they train and how they add it
to the base, but injection, "train only the adapter", merging and adapter files need only this
small protocol (torchtune's AdapterModule plays the same part), so none of them matches on
parameter names or on the class:

    method                    the name an adapter file records ("lora", "ia3", ...)
    adapter_parameter_names   the trained tensors, saved in the file
    adapter_buffer_names      tensors saved but not trained (PiSSA's initial factors, ...)
    config_keys               what adapter_config() returns; a file must match all but
    training_only_keys        those that only matter while training (dropout)
    mergeable, merged, merge(), unmerge(), check_unmerge()
    check_config(config)      raise ValueError for a bad config (a file's, before anything changes)
    check_module(name, base, config)   raise if this base cannot be adapted (DoRA's zero row)
    for_loading(base, config, name)  a layer with that config whose tensors a file will overwrite
"""

from __future__ import annotations

import torch
from torch import nn


class AdapterLayer(nn.Module):
    """Base class of the adapter layers; subclasses set the attributes and write the methods."""

    method = ""
    adapter_parameter_names: tuple = ()
    adapter_buffer_names: tuple = ()
    config_keys: tuple = ("method",)
    training_only_keys: tuple = ()
    mergeable = True  # False where merge() can only raise (a 4-bit base)
    merged = False

    def adapter_config(self) -> dict:
        """The hyper-parameters an adapter file records, JSON-serialisable, keys = config_keys."""
        raise NotImplementedError

    def merge(self) -> None:
        raise NotImplementedError

    def unmerge(self) -> None:
        raise NotImplementedError

    def check_unmerge(self) -> None:
        """Raise if unmerge() would refuse; unmerge_lora asks every layer before it unmerges any."""

    @classmethod
    def check_config(cls, config: dict) -> None:
        """Raise ValueError/TypeError naming what is wrong with `config` (keys = config_keys)."""
        missing = set(cls.config_keys) - set(config)
        if missing:
            raise ValueError(f"a {cls.method} adapter config needs {sorted(missing)}")

    @classmethod
    def check_module(cls, name: str, base: nn.Module, config: dict) -> None:
        """Raise if this method cannot adapt `base` (called `name`) with `config`. Injection and
        loading run it on every target before they wrap any, so a refusal changes nothing."""

    @classmethod
    def for_loading(cls, base: nn.Module, config: dict, name: str | None = None) -> AdapterLayer:
        """A layer over `base` (the module called `name`) with `config`'s hyper-parameters, its
        tensors about to be overwritten by a file's (so a data-dependent initialisation, an SVD or
        a gradient, is skipped). (IA)^3 needs the name: it scales the input of some layers."""
        return cls(base, **{k: v for k, v in config.items() if k in cls.config_keys and k != "method"})

    def adapter_tensor_names(self) -> tuple:
        return (*self.adapter_parameter_names, *self.adapter_buffer_names)

    def adapter_tensors(self) -> dict:
        """{name: tensor} of what a file holds for this layer (detached, as stored)."""
        return {n: getattr(self, n).detach() for n in self.adapter_tensor_names()}

    @torch.no_grad()
    def load_adapter_tensors_(self, tensors: dict) -> None:
        """Copy a file's tensors in (shapes already checked), each kept in its own dtype and device."""
        for name, value in tensors.items():
            own = getattr(self, name)
            own.copy_(value.to(own.device, own.dtype))
