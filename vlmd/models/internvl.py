"""InternVL's vision side: InternViT, pixel shuffle and the MLP projector into the LM's width.

`InternVLVision.forward` turns tiles of pixels into the rows that replace `<IMG_CONTEXT>`
placeholders in the prompt, image_seq_length rows per tile, tile order preserved.
Module and parameter names match the HF checkpoint so the loader maps keys one to one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlmd.models.config import InternVLArch
from vlmd.models.layers import RMSNorm, fuse_linears, make_norm


class PatchEmbeddings(nn.Module):
    """A stride-patch convolution: one vector per patch_size x patch_size square."""

    def __init__(self, arch: InternVLArch) -> None:
        super().__init__()
        size = arch.patch_size
        self.projection = nn.Conv2d(arch.num_channels, arch.vision_hidden_size, kernel_size=size, stride=size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.projection(pixel_values.to(self.projection.weight.dtype))  # [N, hidden, side, side]
        return x.flatten(2).transpose(1, 2)  # [N, side * side, hidden], row-major patches


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
        self.head_dim = hidden // self.num_heads
        self.q_proj = nn.Linear(hidden, hidden, bias=bias)
        self.k_proj = nn.Linear(hidden, hidden, bias=bias)
        self.v_proj = nn.Linear(hidden, hidden, bias=bias)
        self.projection_layer = nn.Linear(hidden, hidden)
        # InternViT-6B normalises q and k across all heads at once (width = hidden, not head_dim).
        eps = arch.vision_layer_norm_eps
        self.q_norm = RMSNorm(hidden, eps) if arch.vision_use_qk_norm else nn.Identity()
        self.k_norm = RMSNorm(hidden, eps) if arch.vision_use_qk_norm else nn.Identity()

    def fuse(self) -> None:
        """One q/k/v GEMM instead of three (the loader calls this once the weights are in)."""
        self.qkv_proj = fuse_linears(self.q_proj, self.k_proj, self.v_proj)
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        width = self.num_heads * self.head_dim  # hidden, or this rank's heads under tensor parallelism
        heads_shape = (batch, seq_len, self.num_heads, self.head_dim)
        q, k, v = self.qkv_proj(x).split(width, dim=-1)  # each [N, seq, width]
        q = self.q_norm(q).reshape(heads_shape).transpose(1, 2)  # [N, heads, seq, head_dim]
        k = self.k_norm(k).reshape(heads_shape).transpose(1, 2)  # [N, heads, seq, head_dim]
        v = v.reshape(heads_shape).transpose(1, 2)  # [N, heads, seq, head_dim]
        out = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5)
        return self.projection_layer(out.transpose(1, 2).reshape(batch, seq_len, width))  # [N, seq, hidden]


class VisionMLP(nn.Module):
    def __init__(self, arch: InternVLArch) -> None:
        super().__init__()
        self.fc1 = nn.Linear(arch.vision_hidden_size, arch.vision_intermediate_size)
        self.fc2 = nn.Linear(arch.vision_intermediate_size, arch.vision_hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x + lambda * branch in one pass over the activations (addcmul), not a multiply then an add.
        x = torch.addcmul(x, self.lambda_1, self.attention(self.layernorm_before(x)))
        return torch.addcmul(x, self.lambda_2, self.mlp(self.layernorm_after(x)))


class VisionEncoder(nn.Module):
    def __init__(self, arch: InternVLArch) -> None:
        super().__init__()
        self.layer = nn.ModuleList(VisionLayer(arch) for _ in range(arch.vision_num_hidden_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x)
        return x


class InternViT(nn.Module):
    """The vision transformer; returns the last hidden states, CLS included."""

    def __init__(self, arch: InternVLArch) -> None:
        super().__init__()
        self.embeddings = VisionEmbeddings(arch)
        self.encoder = VisionEncoder(arch)
        # Checkpoints trained with mean pooling have no final norm; the others end in a LayerNorm.
        self.layernorm = None
        if not arch.vision_use_mean_pooling:
            self.layernorm = nn.LayerNorm(arch.vision_hidden_size, eps=arch.vision_layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.encoder(self.embeddings(pixel_values))  # [N, 1 + num_patches, hidden]
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


def pixel_shuffle(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Fold each (1/scale x 1/scale) block of neighbouring patches into one wider token.

    x: [N, rows, cols, C] -> [N, rows * scale, cols * scale, C / scale^2]. The channel order
    inside a folded token (which neighbour lands where) is the one the checkpoints were trained
    with: fold columns first, then rows, then transpose back.
    """
    n, rows, cols, channels = x.shape
    factor = round(1 / scale)
    assert rows % factor == 0 and cols % factor == 0, "patch grid must divide by the shuffle factor"
    x = x.reshape(n, rows, cols // factor, channels * factor)  # [N, rows, cols/f, C*f]
    x = x.permute(0, 2, 1, 3).contiguous()  # [N, cols/f, rows, C*f]
    x = x.reshape(n, cols // factor, rows // factor, channels * factor * factor)  # [N, cols/f, rows/f, C*f*f]
    return x.permute(0, 2, 1, 3).contiguous()  # [N, rows/f, cols/f, C*f*f]


class InternVLVision(nn.Module):
    """Tiles of pixels -> LM-width embeddings for the `<IMG_CONTEXT>` rows of a prompt."""

    def __init__(self, arch: InternVLArch) -> None:
        super().__init__()
        self.arch = arch
        self.vision_tower = InternViT(arch)
        self.multi_modal_projector = MultiModalProjector(arch)

    def fuse(self) -> None:
        for layer in self.vision_tower.encoder.layer:
            layer.attention.fuse()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values: [num_tiles, 3, image_size, image_size] -> [num_tiles * image_seq_length, hidden]."""
        num_tiles, _, height, width = pixel_values.shape
        side = self.arch.num_patches_per_side
        assert height == width == self.arch.image_size, f"tiles must be {self.arch.image_size}px squares"
        x = self.vision_tower(pixel_values)[:, 1:]  # drop CLS: [N, side * side, vision_hidden]
        x = x.reshape(num_tiles, side, side, -1)  # [N, side, side, vision_hidden]
        x = pixel_shuffle(x, self.arch.downsample_ratio)  # [N, side/f, side/f, vision_hidden * f^2]
        x = x.flatten(0, 2)  # [N * image_seq_length, vision_hidden * f^2]
        return self.multi_modal_projector(x)  # [N * image_seq_length, hidden]
