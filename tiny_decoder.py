"""A Qwen3 decoder from scratch in plain PyTorch: loads a real checkpoint directory and matches transformers' logits.

Usage: python tiny_decoder.py MODEL_DIR "prompt" [--max-new-tokens 32]  # greedy; uses MODEL_DIR/tokenizer.json
"""
import argparse
import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file


class RMSNorm(nn.Module):
    """Scale x to unit root-mean-square, then apply a learned per-channel gain."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        h = x.float()  # statistics in fp32 for precision
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)  # Qwen3 casts back *before* applying the gain


def rope(x, cos, sin):
    """Rotate channel pairs (i, i + hd/2) by a position-dependent angle ("rotate half" layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache:
    """Keys and values of the positions seen so far, per layer: they never change, so a step only appends its own."""

    def __init__(self):
        self.keys = {}  # layer -> (B, nkv, S, hd)
        self.values = {}

    @property
    def length(self):
        """Number of cached positions; every layer holds the same number between forward passes."""
        if 0 not in self.keys:
            return 0
        return self.keys[0].shape[2]

    def update(self, layer, k, v):
        """Append this step's k, v (B, nkv, T, hd) to `layer`'s and return all of them, (B, nkv, S + T, hd)."""
        if layer in self.keys:
            k = torch.cat((self.keys[layer], k), dim=2)
            v = torch.cat((self.values[layer], v), dim=2)
        self.keys[layer] = k
        self.values[layer] = v
        return k, v


class Attention(nn.Module):
    """Causal grouped-query attention: nkv key/value heads serve nh query heads."""

    def __init__(self, cfg, layer):
        super().__init__()
        C = cfg["hidden_size"]
        hd = cfg["head_dim"]  # nh * hd need not equal C
        self.layer = layer  # our slot in the KV cache
        self.nh = cfg["num_attention_heads"]
        self.nkv = cfg["num_key_value_heads"]
        self.hd = hd
        self.q = nn.Linear(C, self.nh * hd, bias=False)
        self.k = nn.Linear(C, self.nkv * hd, bias=False)
        self.v = nn.Linear(C, self.nkv * hd, bias=False)
        self.o = nn.Linear(self.nh * hd, C, bias=False)
        # Qwen3 normalises q and k per head before RoPE: bounds the attention logits (replaces Qwen2's qkv bias)
        self.q_norm = RMSNorm(hd, cfg["rms_norm_eps"])
        self.k_norm = RMSNorm(hd, cfg["rms_norm_eps"])

    def forward(self, x, cos, sin, mask, cache):
        B, T, _ = x.shape  # (B, T, C)
        q = self.q_norm(self.q(x).view(B, T, self.nh, self.hd)).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_norm(self.k(x).view(B, T, self.nkv, self.hd)).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v(x).view(B, T, self.nkv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        q = rope(q, cos, sin)
        k = rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, nkv, S, hd), S = past + T
        rep = self.nh // self.nkv  # query head h reads kv head h // rep
        k = k.repeat_interleave(rep, dim=1)  # (B, nh, S, hd)
        v = v.repeat_interleave(rep, dim=1)
        att = (q @ k.transpose(-2, -1)) * self.hd ** -0.5  # (B, nh, T, S)
        att = att.masked_fill(~mask, torch.finfo(att.dtype).min)  # not -inf: an all-pad row stays finite
        att = att.float().softmax(-1).to(q.dtype)  # softmax in fp32, as transformers does
        y = (att @ v).transpose(1, 2).reshape(B, T, -1)  # (B, T, nh * hd)
        return self.o(y)  # (B, T, C)


class MLP(nn.Module):
    """SwiGLU: a SiLU gate multiplies a linear "up" branch, then "down" projects back to C."""

    def __init__(self, cfg):
        super().__init__()
        C = cfg["hidden_size"]
        H = cfg["intermediate_size"]
        self.gate = nn.Linear(C, H, bias=False)
        self.up = nn.Linear(C, H, bias=False)
        self.down = nn.Linear(H, C, bias=False)

    def forward(self, x):  # (B, T, C) -> (B, T, H) -> (B, T, C)
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg, layer):
        super().__init__()
        self.norm1 = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
        self.attn = Attention(cfg, layer)
        self.norm2 = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.attn(self.norm1(x), cos, sin, mask, cache)
        x = x + self.mlp(self.norm2(x))
        return x


class Qwen3(nn.Module):
    """Embedding -> N blocks -> final RMSNorm -> LM head (optionally tied to the embedding)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        C = cfg["hidden_size"]
        V = cfg["vocab_size"]
        hd = cfg["head_dim"]
        self.embed = nn.Embedding(V, C)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg["num_hidden_layers"]))
        self.norm = RMSNorm(C, cfg["rms_norm_eps"])
        self.lm_head = nn.Linear(C, V, bias=False)
        if cfg["tie_word_embeddings"]:  # small Qwen3s reuse the embedding matrix as the output layer
            self.lm_head.weight = self.embed.weight
        # RoPE frequencies, (hd/2,); a plain attribute, not a buffer, so model.to(bf16) cannot round them
        self.inv_freq = 1.0 / cfg["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, cache=None):
        """attention_mask covers the cached positions too: (B, past + T), 1 = token, 0 = left pad."""
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        B, T, _ = x.shape
        past = 0 if cache is None else cache.length
        am = x.new_ones(B, past + T) if attention_mask is None else attention_mask  # (B, S)
        # a row's first real token is position 0, so count real tokens (as transformers' generate does)
        pos = (am.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]  # (B, T)
        freqs = pos[..., None] * self.inv_freq.to(x.device)  # (B, T, hd/2)
        ang = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, hd): both halves of a pair share an angle
        cos = ang.cos().to(x.dtype)
        sin = ang.sin().to(x.dtype)
        # query t sits at absolute index past + t; it may see keys s <= past + t that are not padding
        causal = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)  # (T, S)
        mask = causal & am.bool()[:, None, None, :]  # (B, 1, T, S)
        for block in self.blocks:
            x = block(x, cos, sin, mask, cache)
        return self.lm_head(self.norm(x))  # (B, T, vocab)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, max_new_tokens=32, eos_token_id=None, use_cache=True):
        """Greedy decoding; returns only the new tokens (B, n). Finished rows repeat their EOS."""
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        stop = torch.tensor([] if eos_token_id is None else eos_token_id, dtype=torch.long, device=input_ids.device)
        stop = stop.flatten()  # eos_token_id may be one id or a list of them
        done = torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)
        cache = KVCache() if use_cache else None
        ids = input_ids
        for _ in range(max_new_tokens):
            # feed only the tokens the cache lacks: the whole prompt at first, then just the newest token
            fresh = ids if cache is None else ids[:, cache.length:]
            nxt = self(fresh, attention_mask=mask, cache=cache)[:, -1].argmax(-1)  # (B,)
            nxt = torch.where(done, ids[:, -1], nxt)
            done |= torch.isin(nxt, stop)
            ids = torch.cat((ids, nxt[:, None]), dim=1)
            mask = torch.cat((mask, mask.new_ones(len(ids), 1)), dim=1)
            if done.all():
                break
        return ids[:, input_ids.shape[1]:]


LAYER_NAMES = {  # HF name under model.layers.{i}. -> our name under blocks.{i}.
    "input_layernorm": "norm1",
    "self_attn.q_proj": "attn.q",
    "self_attn.k_proj": "attn.k",
    "self_attn.v_proj": "attn.v",
    "self_attn.o_proj": "attn.o",
    "self_attn.q_norm": "attn.q_norm",
    "self_attn.k_norm": "attn.k_norm",
    "post_attention_layernorm": "norm2",
    "mlp.gate_proj": "mlp.gate",
    "mlp.up_proj": "mlp.up",
    "mlp.down_proj": "mlp.down",
}


def read_config(path):
    """config.json with the defaults and derived fields the model needs."""
    raw = json.loads((path / "config.json").read_text())
    # transformers 5 writes rope_parameters={"rope_theta": ..., "rope_type": ...}; hub configs a top-level rope_theta
    rope_params = raw.get("rope_parameters") or {"rope_theta": raw.get("rope_theta", 10000.0)}
    if rope_params.get("rope_type", "default") != "default" or raw.get("rope_scaling"):
        raise ValueError("only plain RoPE is supported (no rope_scaling)")
    cfg = {"rms_norm_eps": 1e-6, "tie_word_embeddings": False, **raw}
    cfg["rope_theta"] = rope_params["rope_theta"]
    if not cfg.get("head_dim"):  # Qwen3 configs usually set it, and it may differ from hidden_size / heads
        cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
    return cfg


def read_weights(path):
    """All tensors of model.safetensors, or of the shards listed in model.safetensors.index.json."""
    index = path / "model.safetensors.index.json"
    files = ["model.safetensors"]
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    weights = {}
    for f in files:
        weights.update(load_file(path / f))
    return weights


def load(path, dtype=torch.float32):
    """Build the model from a Qwen3 checkpoint directory; every weight is mapped by name and shape-checked."""
    path = Path(path)
    cfg = read_config(path)
    weights = read_weights(path)
    names = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight"}  # HF -> ours
    if not cfg["tie_word_embeddings"]:
        names["lm_head.weight"] = "lm_head.weight"
    for i in range(cfg["num_hidden_layers"]):
        for hf, ours in LAYER_NAMES.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blocks.{i}.{ours}.weight"
    model = Qwen3(cfg)
    params = dict(model.named_parameters())
    for hf, ours in names.items():
        if hf not in weights:
            raise KeyError(f"missing weight {hf}")
        if weights[hf].shape != params[ours].shape:
            raise ValueError(f"{hf}: checkpoint shape {tuple(weights[hf].shape)} != {tuple(params[ours].shape)}")
        params[ours].data.copy_(weights[hf])
    extra = set(weights) - set(names) - {"lm_head.weight"}  # a tied checkpoint may still ship lm_head
    if extra:
        raise ValueError(f"unexpected weights in checkpoint: {sorted(extra)[:5]}")
    return model.to(dtype).eval()


def main():
    ap = argparse.ArgumentParser(description="Greedy continuation from a Qwen3 checkpoint.")
    ap.add_argument("model_dir")
    ap.add_argument("prompt")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args()
    from tokenizers import Tokenizer  # only the CLI needs it

    tok = Tokenizer.from_file(str(Path(args.model_dir) / "tokenizer.json"))
    model = load(args.model_dir)
    ids = torch.tensor([tok.encode(args.prompt).ids])  # (1, T)
    new = model.generate(ids, max_new_tokens=args.max_new_tokens, eos_token_id=model.cfg.get("eos_token_id"))
    print(tok.decode(torch.cat((ids, new), dim=1)[0].tolist()))


if __name__ == "__main__":
    main()
