"""A Qwen3 decoder from scratch in plain PyTorch: loads a real checkpoint directory and matches transformers' logits.
Usage: python tiny_decoder.py MODEL_DIR "prompt" [--max-new-tokens 32]  # greedy; uses MODEL_DIR/tokenizer.json"""
import argparse
import json
from pathlib import Path
import torch
import torch.nn as nn
from safetensors.torch import load_file

class RMSNorm(nn.Module):  # scale x to unit root-mean-square, then apply a learned per-channel gain
    def __init__(self, dim, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        h = x.float()  # statistics in fp32 for precision; Qwen3 casts back *before* applying the gain
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

def rope(x, cos, sin):  # rotate channel pairs (i, i + hd/2) by a position-dependent angle ("rotate half" layout)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin

class Attention(nn.Module):  # causal grouped-query attention: nkv key/value heads serve nh query heads
    def __init__(self, cfg, layer):
        super().__init__()
        C, hd, eps = cfg["hidden_size"], cfg["head_dim"], cfg["rms_norm_eps"]  # nh * hd need not equal C
        self.layer, self.nh, self.nkv, self.hd = layer, cfg["num_attention_heads"], cfg["num_key_value_heads"], hd
        self.q, self.o = nn.Linear(C, self.nh * hd, bias=False), nn.Linear(self.nh * hd, C, bias=False)
        self.k, self.v = nn.Linear(C, self.nkv * hd, bias=False), nn.Linear(C, self.nkv * hd, bias=False)
        # Qwen3 normalises q and k per head before RoPE: bounds the attention logits (replaces Qwen2's qkv bias)
        self.q_norm, self.k_norm = RMSNorm(hd, eps), RMSNorm(hd, eps)

    def forward(self, x, cos, sin, mask, cache):
        B, T, _ = x.shape  # (B, T, C)
        q = self.q_norm(self.q(x).view(B, T, self.nh, self.hd)).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_norm(self.k(x).view(B, T, self.nkv, self.hd)).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v(x).view(B, T, self.nkv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        if cache is not None:  # keys/values of earlier steps never change: keep them, append this step's
            pk, pv = cache.get(self.layer, (k[:, :, :0], v[:, :, :0]))
            k, v = cache[self.layer] = torch.cat((pk, k), 2), torch.cat((pv, v), 2)  # (B, nkv, S, hd), S = past + T
        rep = self.nh // self.nkv  # query head h reads kv head h // rep
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)  # (B, nh, S, hd)
        att = (q @ k.transpose(-2, -1)) * self.hd ** -0.5  # (B, nh, T, S)
        att = att.masked_fill(~mask, torch.finfo(att.dtype).min)  # not -inf: an all-pad row stays finite
        att = att.float().softmax(-1).to(q.dtype)  # softmax in fp32, as transformers does
        return self.o((att @ v).transpose(1, 2).reshape(B, T, -1))  # (B, T, nh*hd) -> (B, T, C)

class MLP(nn.Module):  # SwiGLU: a SiLU gate multiplies a linear "up" branch, then project back to C
    def __init__(self, cfg):
        super().__init__()
        C, H = cfg["hidden_size"], cfg["intermediate_size"]
        self.gate, self.up = nn.Linear(C, H, bias=False), nn.Linear(C, H, bias=False)
        self.down = nn.Linear(H, C, bias=False)

    def forward(self, x):  # (B, T, C) -> (B, T, H) -> (B, T, C)
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))

class Block(nn.Module):  # pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))
    def __init__(self, cfg, layer):
        super().__init__()
        C, eps = cfg["hidden_size"], cfg["rms_norm_eps"]
        self.norm1, self.attn, self.norm2, self.mlp = RMSNorm(C, eps), Attention(cfg, layer), RMSNorm(C, eps), MLP(cfg)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.attn(self.norm1(x), cos, sin, mask, cache)
        return x + self.mlp(self.norm2(x))

class Qwen3(nn.Module):  # embedding -> N blocks -> final RMSNorm -> LM head (optionally tied to the embedding)
    def __init__(self, cfg):
        super().__init__()
        self.cfg, C, V, hd = cfg, cfg["hidden_size"], cfg["vocab_size"], cfg["head_dim"]
        self.embed = nn.Embedding(V, C)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg["num_hidden_layers"]))
        self.norm, self.lm_head = RMSNorm(C, cfg["rms_norm_eps"]), nn.Linear(C, V, bias=False)
        if cfg["tie_word_embeddings"]:  # small Qwen3s reuse the embedding matrix as the output layer
            self.lm_head.weight = self.embed.weight
        # RoPE frequencies, (hd/2,); a plain attribute, not a buffer, so model.to(bf16) cannot round them
        self.inv_freq = 1.0 / cfg["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, cache=None):
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        B, T, _ = x.shape
        past = cache[0][0].shape[2] if cache else 0  # tokens already held in the KV cache
        am = x.new_ones(B, past + T) if attention_mask is None else attention_mask  # (B, S): 1 = token, 0 = left pad
        # a row's first real token is position 0, so count real tokens (as transformers' generate does)
        pos = (am.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]  # (B, T)
        ang = torch.cat((pos[..., None] * self.inv_freq.to(x.device),) * 2, -1)[:, None]  # (B, 1, T, hd)
        cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
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
        stop = torch.tensor([] if eos_token_id is None else eos_token_id, dtype=torch.long).flatten()
        ids, cache, done = input_ids, ({} if use_cache else None), torch.zeros(len(input_ids), dtype=torch.bool)
        while ids.shape[1] - input_ids.shape[1] < max_new_tokens and not done.all():
            # once the cache is filled only the newest token needs a forward pass
            nxt = self(ids[:, -1:] if cache else ids, attention_mask=mask, cache=cache)[:, -1].argmax(-1)
            nxt = torch.where(done, ids[:, -1], nxt)  # (B,)
            done |= torch.isin(nxt, stop)
            ids, mask = torch.cat((ids, nxt[:, None]), 1), torch.cat((mask, mask.new_ones(len(ids), 1)), 1)
        return ids[:, input_ids.shape[1]:]

LAYER_NAMES = {  # HF name under model.layers.{i}. -> our name under blocks.{i}.
    "input_layernorm": "norm1", "self_attn.q_proj": "attn.q", "self_attn.k_proj": "attn.k",
    "self_attn.v_proj": "attn.v", "self_attn.o_proj": "attn.o", "self_attn.q_norm": "attn.q_norm",
    "self_attn.k_norm": "attn.k_norm", "post_attention_layernorm": "norm2", "mlp.gate_proj": "mlp.gate",
    "mlp.up_proj": "mlp.up", "mlp.down_proj": "mlp.down"}

def load(path, dtype=torch.float32):
    """Build the model from a Qwen3 checkpoint directory; every weight is mapped by name and shape-checked."""
    path = Path(path)
    raw = json.loads((path / "config.json").read_text())
    # transformers 5 writes rope_parameters={"rope_theta": ..., "rope_type": ...}; hub configs a top-level rope_theta
    rope_p = raw.get("rope_parameters") or {"rope_theta": raw.get("rope_theta", 10000.0)}
    assert rope_p.get("rope_type", "default") == "default" and not raw.get("rope_scaling"), "only plain RoPE"
    cfg = {"rms_norm_eps": 1e-6, "tie_word_embeddings": False, **raw, "rope_theta": rope_p["rope_theta"]}
    cfg["head_dim"] = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]  # may differ from C/nh
    index = path / "model.safetensors.index.json"
    files = set(json.loads(index.read_text())["weight_map"].values()) if index.exists() else {"model.safetensors"}
    weights = {k: t for f in files for k, t in load_file(path / f).items()}
    names = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight"}
    names |= {} if cfg["tie_word_embeddings"] else {"lm_head.weight": "lm_head.weight"}
    names |= {f"model.layers.{i}.{hf}.weight": f"blocks.{i}.{ours}.weight"
              for i in range(cfg["num_hidden_layers"]) for hf, ours in LAYER_NAMES.items()}
    model = Qwen3(cfg)
    params = dict(model.named_parameters())
    for hf, ours in names.items():
        if hf not in weights:
            raise KeyError(f"missing weight {hf}")
        if weights[hf].shape != params[ours].shape:
            raise ValueError(f"{hf}: checkpoint shape {tuple(weights[hf].shape)} != {tuple(params[ours].shape)}")
        params[ours].data.copy_(weights[hf])
    if extra := set(weights) - set(names) - {"lm_head.weight"}:  # a tied checkpoint may still ship lm_head
        raise ValueError(f"unexpected weights in checkpoint: {sorted(extra)[:5]}")
    return model.to(dtype).eval()

def main():
    ap = argparse.ArgumentParser(description="Greedy continuation from a Qwen3 checkpoint.")
    ap.add_argument("model_dir")
    ap.add_argument("prompt")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args()
    from tokenizers import Tokenizer
    tok, model = Tokenizer.from_file(str(Path(args.model_dir) / "tokenizer.json")), load(args.model_dir)
    ids = torch.tensor([tok.encode(args.prompt).ids])  # (1, T)
    new = model.generate(ids, max_new_tokens=args.max_new_tokens, eos_token_id=model.cfg.get("eos_token_id"))
    print(tok.decode(torch.cat((ids, new), 1)[0].tolist()))

if __name__ == "__main__":
    main()
