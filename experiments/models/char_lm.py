"""A character-level causal Transformer LM (NNX): pre-LN blocks, nnx.MultiHeadAttention."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx


class Block(nnx.Module):
  def __init__(self, d_model: int, num_heads: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.ln1 = nnx.LayerNorm(d_model, dtype=dtype, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads, d_model, decode=False, dtype=dtype, rngs=rngs)
    self.ln2 = nnx.LayerNorm(d_model, dtype=dtype, rngs=rngs)
    self.up = nnx.Linear(d_model, 4 * d_model, dtype=dtype, rngs=rngs)
    self.down = nnx.Linear(4 * d_model, d_model, dtype=dtype, rngs=rngs)

  def __call__(self, x, mask):  # x: (batch, seq, d_model)
    x = x + self.attn(self.ln1(x), mask=mask)
    return x + self.down(nnx.gelu(self.up(self.ln2(x))))


class CharLM(nnx.Module):
  """Parameters are f32; `dtype` is the compute dtype (bfloat16 for mixed-precision training on accelerators)."""

  def __init__(self, vocab_size: int, seq_len: int, d_model: int, num_heads: int, num_layers: int, *,
               rngs: nnx.Rngs, dtype=jnp.float32):
    self.tok = nnx.Embed(vocab_size, d_model, dtype=dtype, rngs=rngs)
    self.pos = nnx.Embed(seq_len, d_model, dtype=dtype, rngs=rngs)
    self.blocks = nnx.List([Block(d_model, num_heads, rngs=rngs, dtype=dtype) for _ in range(num_layers)])
    self.ln_f = nnx.LayerNorm(d_model, dtype=dtype, rngs=rngs)
    self.head = nnx.Linear(d_model, vocab_size, dtype=dtype, rngs=rngs)

  def __call__(self, tokens):  # tokens: (batch, seq) int32
    seq = tokens.shape[1]
    x = self.tok(tokens) + self.pos(jnp.arange(seq))[None]  # (batch, seq, d_model)
    mask = nnx.make_causal_mask(tokens)  # (batch, 1, seq, seq)
    for block in self.blocks:
      x = block(x, mask)
    return self.head(self.ln_f(x))  # (batch, seq, vocab)
