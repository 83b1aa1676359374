"""A slow, obviously-correct Online Normalization, written line by line from the doc.

One Python loop over the samples of the batch, one statement per equation of
``docs/online-norm.md``. Used only to check the vectorized layer.

``control="stable"`` replaces the doc's v step by its implicit (backward Euler) form,
``v_t = (v_{t-1} + mean(g_t * y_t)) / (1 + (1 - a_b) * mean(y_t^2))``, written here from that
equation. ``projection="batch"`` gives a batch of two samples or more the input gradient
``g_t / k_t`` (the statistics held constant, no controls) less, per channel over the batch's
values, its least-squares fit on the constant and on ``x - mean(x)`` (``eps`` added to the
variance: BatchNorm's projection); u and v advance as the doc says. Everything else is the doc's.
"""

from __future__ import annotations

import torch


class ReferenceOnlineNorm:
    """Per-sample ON state machine for one layer; all tensors per channel, shape (C,)."""

    def __init__(
        self, mean, var, u, v, weight, bias, alpha_fwd, alpha_bkw, eps, ecm, clamp_value, ls_eps, control="exact",
        projection="none",
    ):  # fmt: skip
        self.mu, self.var, self.u, self.v = mean.clone(), var.clone(), u.clone(), v.clone()
        self.weight, self.bias = weight, bias
        self.a_f, self.a_b, self.eps = alpha_fwd, alpha_bkw, eps
        self.ecm, self.c, self.ls_eps = ecm, clamp_value, ls_eps
        self.control, self.projection = control, projection
        # Not part of the math: how much the exact v recurrence can amplify a rounding error so far, the
        # product over samples of max(1, |decay|) with decay = 1 - (1 - a_b) * mean(y^2), per channel.
        self.amplification = torch.ones_like(self.v)

    def forward(self, x):
        """Training forward on a batch (N, C, *spatial); returns the normalized y (N, C, *spatial)."""
        ys, self.ks, self.x = [], [], x
        for x_t in x:  # the stream, in index order
            flat = x_t.reshape(x_t.shape[0], -1)  # (C, positions)
            m_t = flat.mean(dim=1)
            s_t = ((flat - m_t[:, None]) ** 2).mean(dim=1)
            k_t = torch.sqrt(self.var + self.eps)
            y_t = (flat - self.mu[:, None]) / k_t[:, None]
            d_t = m_t - self.mu
            self.var = self.a_f * self.var + (1 - self.a_f) * s_t + self.a_f * (1 - self.a_f) * d_t**2
            self.mu = self.mu + (1 - self.a_f) * d_t
            ys.append(y_t.reshape(x_t.shape))
            self.ks.append(k_t)
        return torch.stack(ys)

    def backward(self, y, grad_y):
        """Training backward: dL/dx from dL/dy, advancing u and v."""
        grads = []
        for y_t, g_t, k_t in zip(y, grad_y, self.ks):
            y_f = y_t.reshape(y_t.shape[0], -1)
            g_f = g_t.reshape(g_t.shape[0], -1)
            g_p = g_f - (1 - self.a_b) * self.v[:, None] * y_f
            if self.control == "stable":
                self.v = (self.v + (g_f * y_f).mean(dim=1)) / (1 + (1 - self.a_b) * (y_f**2).mean(dim=1))
            else:
                self.v = self.v + (g_p * y_f).mean(dim=1)
                decay = 1 - (1 - self.a_b) * (y_f**2).mean(dim=1)
                self.amplification = self.amplification * decay.abs().clamp(min=1)
            h_t = g_p / k_t[:, None]
            dx_t = h_t - (1 - self.a_b) * self.u[:, None]
            self.u = self.u + dx_t.mean(dim=1)
            grads.append(dx_t.reshape(g_t.shape))
        if self.projection == "batch" and len(grads) > 1:
            return self.projected(grad_y)
        return torch.stack(grads)

    def projected(self, grad_y):
        """``projection="batch"``: dL/dx for a batch of two or more, channel by channel."""
        plain = torch.stack([g_t / k_t.reshape(-1, *[1] * (g_t.ndim - 1)) for g_t, k_t in zip(grad_y, self.ks)])
        grad_x = torch.empty_like(plain)
        for c in range(plain.shape[1]):
            g_c, x_c = plain[:, c].reshape(-1), self.x[:, c].reshape(-1)
            xc = x_c - x_c.mean()
            fit = g_c.mean() + xc * (g_c * xc).mean() / ((xc * xc).mean() + self.eps)
            grad_x[:, c] = (g_c - fit).reshape(grad_x[:, c].shape)
        return grad_x

    def affine_ecm(self, y):
        """z = gamma * y + beta, then the ECM; differentiable with ordinary autograd."""
        shape = (1, -1) + (1,) * (y.ndim - 2)
        z = y
        if self.weight is not None:
            z = z * self.weight.reshape(shape) + self.bias.reshape(shape)
        if self.ecm == "clamp":
            return torch.clamp(z, -self.c, self.c)
        if self.ecm == "layer_scaling":
            return z / torch.sqrt((z**2).mean(dim=tuple(range(1, z.ndim)), keepdim=True) + self.ls_eps)
        return z

    def train_step(self, x, grad_out):
        """One forward + backward; returns (out, dL/dx, dL/dweight, dL/dbias)."""
        y = self.forward(x).detach().requires_grad_(True)
        weight = None if self.weight is None else self.weight.detach().requires_grad_(True)
        bias = None if self.bias is None else self.bias.detach().requires_grad_(True)
        saved = self.weight, self.bias
        self.weight, self.bias = weight, bias
        out = self.affine_ecm(y)
        self.weight, self.bias = saved
        params = [t for t in (y, weight, bias) if t is not None]
        grads = torch.autograd.grad(out, params, grad_out)
        grad_x = self.backward(y.detach(), grads[0])
        grad_w, grad_b = (grads[1], grads[2]) if weight is not None else (None, None)
        return out.detach(), grad_x, grad_w, grad_b
