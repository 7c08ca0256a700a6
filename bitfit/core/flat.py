"""Every trainable bias in ONE flat fp32 buffer, every bias gradient in ONE flat gradient buffer.

    values:     [ h.0.qkv.bias | h.0.dense.bias | ... | h.23.mlp.dense_4h_to_h.bias ]   <- self.values
                  ^ param.data of each bias is a view of its slice
    gradients:  [ ............ same layout ............................................ ]   <- self.grads
                  ^ param.grad of each bias is a view of its slice

Autograd accumulates each bias gradient in place into its `.grad` (a view), so after backward the whole
gradient already lies in one tensor: clipping, all-reduce and AdamW each touch ONE tensor instead of
hundreds of small ones, and the delta export is one subtraction.

Rules that keep the views valid: build this after the model is on its device and in its dtype (a later
`.to()` or `.half()` replaces the tensors), and clear gradients with `zero_grad()` here, never with
`optimizer.zero_grad()` (its default set_to_none would detach the gradient views).
"""

import torch
from torch import nn

from bitfit.core.biases import Selection


class FlatBiases:
    """The flat value and gradient buffers of the selected biases, and where each bias lies in them."""

    def __init__(self, model: nn.Module, selection: Selection):
        params = dict(model.named_parameters())
        self.names = list(selection)
        self.shapes = [params[name].shape for name in self.names]
        sizes = [params[name].numel() for name in self.names]
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        device = params[self.names[0]].device

        # fp32 whatever the model's dtype: small updates (lr x 1e-3) vanish in a bf16 bias.
        self.values = torch.empty(self.offsets[-1], dtype=torch.float32, device=device)
        self.grads = torch.zeros_like(self.values)
        for name, (start, end), shape in zip(self.names, self._spans(), self.shapes):
            param = params[name]
            self.values[start:end].copy_(param.detach().reshape(-1))
            param.data = self.values[start:end].view(shape)
            param.grad = self.grads[start:end].view(shape)
        self.base = self.values.clone()  # the biases before training: the delta is values - base

        # The optimizer steps this one Parameter; it shares memory with `values`, its .grad is `grads`.
        self.param = nn.Parameter(self.values)
        self.param.grad = self.grads

        # Entries outside the selection's masks (the k and v parts of a fused q/k/v bias under the
        # reduced selection) get a zero gradient, so AdamW without weight decay never moves them.
        mask = torch.cat([selection[name].to(device) for name in self.names])
        self.mask = None if bool(mask.all()) else mask
        if self.mask is not None:
            for name, (start, end), shape in zip(self.names, self._spans(), self.shapes):
                keep = self.mask[start:end].view(shape)
                params[name].register_hook(lambda grad, keep=keep: grad * keep)
        self._params = [params[name] for name in self.names]

    def _spans(self) -> list[tuple[int, int]]:
        return list(zip(self.offsets[:-1], self.offsets[1:]))

    @property
    def num_trainable(self) -> int:
        """Entries that train (the mask's True entries; all of them when there is no mask)."""
        return self.values.numel() if self.mask is None else int(self.mask.sum())

    def zero_grad(self) -> None:
        """Zero the gradient buffer in place, so the views stay where they are."""
        self.grads.zero_()

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a tensor laid out like the buffer into {bias name: tensor of that bias's shape}."""
        return {name: flat[start:end].view(shape) for name, (start, end), shape in zip(self.names, self._spans(), self.shapes)}

    def check(self) -> None:
        """Raise if any bias or its gradient no longer lies in the flat buffers (a broken invariant)."""
        grad = self.param.grad
        if grad is None or grad.data_ptr() != self.grads.data_ptr():
            raise RuntimeError("the optimizer's parameter no longer has the flat gradient as its .grad "
                               "(optimizer.zero_grad() sets it to None): clear gradients with FlatBiases.zero_grad()")
        for name, param, (start, end) in zip(self.names, self._params, self._spans()):
            for tensor, buffer, what in ((param, self.values, "value"), (param.grad, self.grads, "gradient")):
                expected = buffer.data_ptr() + start * buffer.element_size()
                if tensor is None or tensor.data_ptr() != expected or tensor.numel() != end - start:
                    raise RuntimeError(f"the {what} of {name} no longer lies in the flat buffer: was the model "
                                       "moved or cast after FlatBiases was built, or optimizer.zero_grad() called?")
