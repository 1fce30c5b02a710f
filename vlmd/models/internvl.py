"""InternVL's vision side: InternViT, pixel shuffle and the MLP projector into the LM's width.

`InternVLVision.forward` turns tiles of pixels into the rows that replace `<IMG_CONTEXT>`
placeholders in the prompt, image_seq_length rows per tile, tile order preserved.
Module and parameter names match the HF checkpoint so the loader maps keys one to one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmd.kernels.add_norm import make_add_layer_norm
from vlmd.kernels.vision_attention import SDPA_TILE_ATTENTION
from vlmd.models.config import InternVLArch
from vlmd.models.layers import RMSNorm, fuse_linears, make_norm


class PatchEmbeddings(nn.Module):
    """A stride-patch convolution: one vector per patch_size x patch_size square.

    Loads as HF's Conv2d and runs as one GEMM over the unfolded patches: the convolution's
    kernel equals its stride, so each output is a dot product of one patch with one filter, and
    a GEMM does that at full speed where cuDNN's implicit convolution took 0.76 ms of a
    12-tile ViT forward on an H200 (3.5%).
    """

    def __init__(self, arch: InternVLArch) -> None:
        super().__init__()
        size = arch.patch_size
        self.projection = nn.Conv2d(arch.num_channels, arch.vision_hidden_size, kernel_size=size, stride=size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        weight, bias = self.projection.weight, self.projection.bias  # [hidden, C, p, p], [hidden]
        n, channels, height, width = pixel_values.shape
        p = self.projection.kernel_size[0]
        x = pixel_values.to(weight.dtype).reshape(n, channels, height // p, p, width // p, p)
        # [N, rows, cols, C, p, p]: row-major patches, each flattened in the filters' (C, i, j) order
        x = x.permute(0, 2, 4, 1, 3, 5).reshape(n, (height // p) * (width // p), channels * p * p)
        return F.linear(x, weight.reshape(weight.shape[0], -1), bias)  # [N, side * side, hidden]


class VisionEmbeddings(nn.Module):
    """Patch embeddings with a CLS token in front and learned absolute positions added."""

    def __init__(self, arch: InternVLArch) -> None:
        super().__init__()
        hidden = arch.vision_hidden_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden))
        self.patch_embeddings = PatchEmbeddings(arch)
        self.position_embeddings = None
        if arch.vision_use_absolute_position_embeddings:
            self.position_embeddings = nn.Parameter(torch.zeros(1, arch.num_patches_per_side**2 + 1, hidden))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embeddings(pixel_values)  # [N, num_patches, hidden]
        cls = self.cls_token.expand(patches.shape[0], -1, -1)  # [N, 1, hidden]
        x = torch.cat((cls, patches), dim=1)  # [N, 1 + num_patches, hidden]
        if self.position_embeddings is not None:
            x = x + self.position_embeddings
        return x


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention over one tile's tokens, optional RMS qk-norm."""

    def __init__(self, arch: InternVLArch) -> None:
        super().__init__()
        hidden, bias = arch.vision_hidden_size, arch.vision_attention_bias
        self.num_heads = arch.vision_num_attention_heads
        self.head_dim = arch.vision_head_dim
        self.q_proj = nn.Linear(hidden, hidden, bias=bias)
        self.k_proj = nn.Linear(hidden, hidden, bias=bias)
        self.v_proj = nn.Linear(hidden, hidden, bias=bias)
        self.projection_layer = nn.Linear(hidden, hidden)
        # InternViT-6B normalises q and k across all heads at once (width = hidden, not head_dim).
        eps = arch.vision_layer_norm_eps
        self.q_norm = RMSNorm(hidden, eps) if arch.vision_use_qk_norm else nn.Identity()
        self.k_norm = RMSNorm(hidden, eps) if arch.vision_use_qk_norm else nn.Identity()
        self.tile_attention = SDPA_TILE_ATTENTION  # `InternVLVision.set_tile_attention` may replace it

    def fuse(self) -> None:
        """One q/k/v GEMM instead of three (the loader calls this once the weights are in)."""
        self.qkv_proj = fuse_linears(self.q_proj, self.k_proj, self.v_proj)
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        width = self.num_heads * self.head_dim  # hidden, or this rank's heads under tensor parallelism
        heads_shape = (batch, seq_len, self.num_heads, self.head_dim)
        q, k, v = self.qkv_proj(x).split(width, dim=-1)  # each [N, seq, width]
        q = self.q_norm(q).view(heads_shape)  # [N, seq, heads, head_dim]
        k = self.k_norm(k).view(heads_shape)
        out = self.tile_attention(q, k, v.view(heads_shape), self.head_dim**-0.5)  # [N, seq, heads, head_dim]
        return self.projection_layer(out.reshape(batch, seq_len, width))  # [N, seq, hidden]


class VisionMLP(nn.Module):
    """fc2(GELU(fc1(x))).

    On CUDA in half precision the GELU runs in fc1's GEMM epilogue (cuBLASLt), which saves a
    pass over the widest activation (1.75 ms of a 12-tile InternViT-300M forward on an H200,
    8%). cuBLASLt's GELU is the tanh form: it differs from the exact (erf) GELU by at most 5e-4,
    a few percent of one bfloat16 step at the values where it differs most. Elsewhere (the CPU,
    float32) the exact GELU runs, as in transformers.
    """

    def __init__(self, arch: InternVLArch) -> None:
        super().__init__()
        self.fc1 = nn.Linear(arch.vision_hidden_size, arch.vision_intermediate_size)
        self.fc2 = nn.Linear(arch.vision_intermediate_size, arch.vision_hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
            fc1 = self.fc1
            h = torch._addmm_activation(fc1.bias, x.reshape(-1, x.shape[-1]), fc1.weight.t(), use_gelu=True)
            return self.fc2(h.view(*x.shape[:-1], h.shape[-1]))
        return self.fc2(F.gelu(self.fc1(x)))


class VisionLayer(nn.Module):
    """Pre-norm ViT block whose two residual branches are scaled per channel (layer scale)."""

    def __init__(self, arch: InternVLArch) -> None:
        super().__init__()
        hidden, eps = arch.vision_hidden_size, arch.vision_layer_norm_eps
        self.layernorm_before = make_norm(arch.vision_norm_type, hidden, eps)
        self.attention = VisionAttention(arch)
        self.lambda_1 = nn.Parameter(torch.ones(hidden))
        self.layernorm_after = make_norm(arch.vision_norm_type, hidden, eps)
        self.mlp = VisionMLP(arch)
        self.lambda_2 = nn.Parameter(torch.ones(hidden))
        self.layer_scale_folded = False

    def fold_layer_scale(self) -> None:
        """Scale the rows (and bias) of each branch's output projection by its layer scale, once,
        in float32: the branches then end scaled and the residual adds are plain adds. A multiply
        with a per-channel vector does not vectorize in torch (the layer-scale addcmul ran at 44%
        of the copy bandwidth: 1.94 ms of a 12-tile InternViT-300M forward on an H200)."""
        for scale, linear in (
            (self.lambda_1, self.attention.projection_layer),
            (self.lambda_2, self.mlp.fc2),
        ):
            factor = scale.detach().float()
            for name, value in (("weight", factor[:, None]), ("bias", factor)):
                param = getattr(linear, name)
                setattr(
                    linear, name, nn.Parameter((param.float() * value).to(param.dtype), requires_grad=False)
                )
        self.layer_scale_folded = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layer_scale_folded:
            x = x + self.attention(self.layernorm_before(x))
            return x + self.mlp(self.layernorm_after(x))
        # x + lambda * branch in one pass over the activations (addcmul), not a multiply then an add.
        x = torch.addcmul(x, self.lambda_1, self.attention(self.layernorm_before(x)))
        return torch.addcmul(x, self.lambda_2, self.mlp(self.layernorm_after(x)))


class VisionEncoder(nn.Module):
    def __init__(self, arch: InternVLArch) -> None:
        super().__init__()
        self.layer = nn.ModuleList(VisionLayer(arch) for _ in range(arch.vision_num_hidden_layers))
        # `InternVLVision.fuse` sets a `vlmd.kernels.add_norm` op where every residual add meets
        # a LayerNorm after it and the layer scales are folded: then `forward_add_norm` runs.
        self.add_norm = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x)
        return x

    def forward_add_norm(self, x: torch.Tensor, final_norm: nn.LayerNorm | None) -> torch.Tensor:
        """The layers' arithmetic with each residual add fused into the LayerNorm that reads it
        (the next branch's, at the end `final_norm`'s); returns final_norm's rows, or the
        residual stream where there is no final norm."""
        layers = self.layer
        normed = layers[0].layernorm_before(x)
        for i, layer in enumerate(layers):
            x, normed = self._add_norm(x, layer.attention(normed), layer.layernorm_after)
            branch = layer.mlp(normed)
            following = layers[i + 1].layernorm_before if i + 1 < len(layers) else final_norm
            if following is None:
                return x + branch
            x, normed = self._add_norm(x, branch, following)
        return normed

    def _add_norm(self, x: torch.Tensor, branch: torch.Tensor, norm: nn.LayerNorm):
        return self.add_norm(x, branch, norm.weight, norm.bias, norm.eps)


class InternViT(nn.Module):
    """The vision transformer; returns the last hidden states, CLS included."""

    def __init__(self, arch: InternVLArch) -> None:
        super().__init__()
        self.embeddings = VisionEmbeddings(arch)
        self.encoder = VisionEncoder(arch)
        # HF-native checkpoints trained without mean pooling end in a LayerNorm; the others have
        # none, and none applies when the features come from before the last layer.
        self.layernorm = None
        if arch.vision_final_norm:
            self.layernorm = nn.LayerNorm(arch.vision_hidden_size, eps=arch.vision_layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixel_values)  # [N, 1 + num_patches, hidden]
        if self.encoder.add_norm is not None:
            return self.encoder.forward_add_norm(x, self.layernorm)
        x = self.encoder(x)
        return x if self.layernorm is None else self.layernorm(x)


class MultiModalProjector(nn.Module):
    """LayerNorm -> Linear -> GELU -> Linear, from shuffled vision width to the LM's hidden size."""

    def __init__(self, arch: InternVLArch) -> None:
        super().__init__()
        self.layer_norm = nn.LayerNorm(arch.projector_input_size)
        self.linear_1 = nn.Linear(arch.projector_input_size, arch.hidden_size)
        self.linear_2 = nn.Linear(arch.hidden_size, arch.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(self.layer_norm(x))))


def pixel_shuffle(x: torch.Tensor, scale: float, transpose_back: bool = True) -> torch.Tensor:
    """Fold each (1/scale x 1/scale) block of neighbouring patches into one wider token.

    x: [N, rows, cols, C] -> [N, rows * scale, cols * scale, C / scale^2]. The channel order
    inside a folded token (which neighbour lands where) is the one the checkpoints were trained
    with: fold columns first, then rows, then transpose back. Checkpoints of OpenGVLab's
    ps_version "v1" were trained without the last transpose (`transpose_back=False`): their
    tokens come out in column-major order.
    """
    n, rows, cols, channels = x.shape
    factor = round(1 / scale)
    assert rows % factor == 0 and cols % factor == 0, "patch grid must divide by the shuffle factor"
    x = x.reshape(n, rows, cols // factor, channels * factor)  # [N, rows, cols/f, C*f]
    x = x.permute(0, 2, 1, 3).contiguous()  # [N, cols/f, rows, C*f]
    x = x.reshape(n, cols // factor, rows // factor, channels * factor * factor)  # [N, cols/f, rows/f, C*f*f]
    if not transpose_back:
        return x
    return x.permute(0, 2, 1, 3).contiguous()  # [N, rows/f, cols/f, C*f*f]


class InternVLVision(nn.Module):
    """Tiles of pixels -> LM-width embeddings for the `<IMG_CONTEXT>` rows of a prompt."""

    def __init__(self, arch: InternVLArch) -> None:
        super().__init__()
        self.arch = arch
        self.vision_tower = InternViT(arch)
        self.multi_modal_projector = MultiModalProjector(arch)

    def fuse(self) -> None:
        """Fused q/k/v projections; on CUDA in half precision, layer scales folded into the
        branches' output projections too, and each residual add run with the LayerNorm after it
        in one kernel (the CPU keeps transformers' arithmetic op for op)."""
        weight = next(self.parameters())
        encoder = self.vision_tower.encoder
        for layer in encoder.layer:
            layer.attention.fuse()
        if weight.is_cuda and weight.dtype in (torch.float16, torch.bfloat16):
            for layer in encoder.layer:
                layer.fold_layer_scale()
            if self.arch.vision_norm_type == "layer_norm":
                encoder.add_norm = make_add_layer_norm(
                    weight.device, weight.dtype, self.arch.vision_hidden_size
                )

    def set_tile_attention(self, attention) -> None:
        """Run every layer's attention with `attention` (`vlmd.kernels.vision_attention`)."""
        for layer in self.vision_tower.encoder.layer:
            layer.attention.tile_attention = attention

    @property
    def tile_attention(self):
        return self.vision_tower.encoder.layer[0].attention.tile_attention

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values: [num_tiles, 3, image_size, image_size] -> [num_tiles * image_seq_length, hidden]."""
        num_tiles, _, height, width = pixel_values.shape
        side = self.arch.num_patches_per_side
        assert height == width == self.arch.image_size, f"tiles must be {self.arch.image_size}px squares"
        x = self.vision_tower(pixel_values)[:, 1:]  # drop CLS: [N, side * side, vision_hidden]
        x = x.reshape(num_tiles, side, side, -1)  # [N, side, side, vision_hidden]
        # [N, side/f, side/f, vision_hidden * f^2]
        x = pixel_shuffle(x, self.arch.downsample_ratio, transpose_back=not self.arch.pixel_shuffle_v1)
        x = x.flatten(0, 2)  # [N * image_seq_length, vision_hidden * f^2]
        return self.multi_modal_projector(x)  # [N * image_seq_length, hidden]
