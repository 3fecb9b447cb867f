"""A small text transformer over caption tokens: GLIDE's text encoder (Nichol et al. 2022, sec. 2.3).

GLIDE encodes the caption with a transformer trained jointly with the diffusion model, and uses it
twice: the final token's embedding replaces the class embedding (it is added to the timestep
embedding every ResBlock reads), and every token's embedding is projected and joined to the keys
and values of every attention layer of the UNet (nn.unet.AttentionBlock's `context`).

Pre-LayerNorm blocks (as GPT-2 and CLIP's text tower): x + MHA(LN(x)), then x + MLP(LN(x)), with a
final LayerNorm. The attention is bidirectional with a key padding mask (True: a real token), so
padding never reaches a real token; it goes through `course_lib.nn.attention.attention`.
"""
from __future__ import annotations

import torch
from torch import nn

from course_lib.nn.attention import attention


class TextBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} must be divisible by heads {heads}")
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))

    def forward(self, x, mask):                      # x (B, L, W), mask (B, L) bool
        B, L, W = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(B, L, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        h = attention(q, k, v, key_padding_mask=mask)     # (B, nh, L, hd)
        x = x + self.proj(h.transpose(1, 2).reshape(B, L, W))
        return x + self.mlp(self.ln2(x))


class TextTransformer(nn.Module):
    """tokens (B, L) int, mask (B, L) bool -> token embeddings (B, L, width)."""

    def __init__(self, vocab_size: int, context_length: int, width: int = 128, layers: int = 2, heads: int = 4):
        super().__init__()
        self.vocab_size, self.context_length, self.width = vocab_size, context_length, width
        self.token_embed = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.randn(context_length, width) * 0.01)
        self.blocks = nn.ModuleList(TextBlock(width, heads) for _ in range(layers))
        self.ln_final = nn.LayerNorm(width)
        nn.init.normal_(self.token_embed.weight, std=0.02)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype.is_floating_point:
            raise ValueError(f"tokens must be an integer tensor (B, L), got "
                             f"{getattr(tokens, 'dtype', type(tokens).__name__)} {tuple(getattr(tokens, 'shape', ()))}")
        if tokens.shape[1] > self.context_length:
            raise ValueError(f"{tokens.shape[1]} tokens exceed the context length {self.context_length}")
        if mask.shape != tokens.shape or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor shaped {tuple(tokens.shape)}, got {mask.dtype} {tuple(mask.shape)}")
        if int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got [{int(tokens.min())}, {int(tokens.max())}]")
        x = self.token_embed(tokens) + self.pos_embed[:tokens.shape[1]]
        for block in self.blocks:
            x = block(x, mask)
        return self.ln_final(x)


def last_token(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The embedding of each row's last real token (B, W): the end-of-text token, GLIDE's pooled text."""
    last = mask.long().sum(1) - 1
    if bool((last < 0).any()):
        raise ValueError("a row of the mask has no real token")
    return h[torch.arange(h.shape[0], device=h.device), last]

