"""Parity tests for tiny_decoder.py against transformers' Qwen3ForCausalLM (offline, CPU, tiny random models)."""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen3Config, Qwen3ForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import tiny_decoder  # noqa: E402

VOCAB, T = 200, 12
THETA = 5000.0  # not the 10000 default, so a config reader that ignores rope_theta fails
LOGIT_TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one intra-op thread is fastest and immune to spin-waiting when other jobs share the CPUs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_hf_model(tie, seed=0):
    """Tiny random Qwen3 with GQA (4 q heads, 2 kv heads) and head_dim 24 != hidden / heads = 16."""
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=128,
                      rope_parameters={"rope_type": "default", "rope_theta": THETA}, tie_word_embeddings=tie)
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():  # HF inits every norm gain to 1; randomise them so a swapped norm mapping is caught
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if name.endswith("norm.weight") else 0.2 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def ckpt(request, tmp_path_factory):
    """(transformers model, checkpoint dir written by save_pretrained, tie flag)."""
    hf = make_hf_model(request.param)
    path = tmp_path_factory.mktemp("tied" if request.param else "untied")
    hf.save_pretrained(path)
    assert (path / "model.safetensors").exists()
    return hf, path, request.param


@pytest.fixture(scope="module")
def batch():
    """Three rows with LEFT padding: 0, 3 and 7 pad positions."""
    torch.manual_seed(1)
    ids = torch.randint(1, VOCAB, (3, T))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :7] = 0
    return ids.masked_fill(mask == 0, 0), mask


def hf_logits(hf, ids, mask):
    # A plain transformers forward uses arange positions even with left padding (only generate() derives them from
    # the mask), so pass cumsum(mask) - 1 explicitly: the positions tiny_decoder computes. RoPE is relative, so the
    # per-row offset would only change rounding, but this way both sides do the identical computation.
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits


def max_diff(a, b, mask):
    return (a - b)[mask.bool()].abs().max().item()  # only real (non-pad) query positions


def test_logits_match_transformers_with_left_padding(ckpt, batch, record_property):
    hf, path, tie = ckpt
    ids, mask = batch
    model = tiny_decoder.load(path)
    assert model.cfg["tie_word_embeddings"] is tie and model.cfg["rope_theta"] == THETA
    with torch.no_grad():
        ours = model(ids, attention_mask=mask)
    assert ours.shape == (3, T, VOCAB) and ours.dtype == torch.float32
    assert torch.isfinite(ours).all(), "padded rows may be garbage but must not be NaN/inf"
    diff = max_diff(ours, hf_logits(hf, ids, mask), mask)
    record_property("max_abs_logit_diff", diff)
    print(f"\nmax |logit diff| ({'tied' if tie else 'untied'}): {diff:.3e}")
    assert diff < LOGIT_TOL, f"max |logit diff| = {diff:.3e}"


def test_greedy_generation_matches_transformers(ckpt, batch):
    hf, path, _ = ckpt
    ids, mask = batch
    model = tiny_decoder.load(path)
    theirs = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=20, min_new_tokens=20,
                         pad_token_id=0)[:, T:]
    ours = model.generate(ids, attention_mask=mask, max_new_tokens=20)
    assert theirs.shape == ours.shape == (3, 20)
    assert torch.equal(ours, theirs), f"\nours   {ours.tolist()}\ntheirs {theirs.tolist()}"
    # with an EOS: both stop on it; compare each row up to and including its first EOS
    eos = int(ours[0, 5])
    theirs = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=20, eos_token_id=eos,
                         pad_token_id=0)[:, T:]
    ours = model.generate(ids, attention_mask=mask, max_new_tokens=20, eos_token_id=eos)
    assert ours.shape[1] <= 20
    for o, t in zip(ours.tolist(), theirs.tolist()):
        n = o.index(eos) + 1 if eos in o else len(o)
        assert o[:n] == t[:n]
        assert all(tok == eos for tok in o[n:]), "finished rows repeat their EOS"


def test_kv_cache_matches_no_cache(ckpt, batch):
    _, path, _ = ckpt
    ids, mask = batch
    model = tiny_decoder.load(path)
    cached = model.generate(ids, attention_mask=mask, max_new_tokens=20, use_cache=True)
    uncached = model.generate(ids, attention_mask=mask, max_new_tokens=20, use_cache=False)
    assert torch.equal(cached, uncached)
    # and the logits themselves: prompt into the cache, then one step, vs. one full forward
    with torch.no_grad():
        cache = tiny_decoder.KVCache()
        model(ids[:, :-1], attention_mask=mask[:, :-1], cache=cache)
        assert cache.length == T - 1
        step = model(ids[:, -1:], attention_mask=mask, cache=cache)[:, -1]
        assert cache.length == T
        full = model(ids, attention_mask=mask)[:, -1]
    assert (step - full).abs().max().item() < 1e-5


def test_kv_cache_appends_along_the_sequence_axis():
    torch.manual_seed(2)
    k1 = torch.randn(2, 3, 4, 5)  # (B, nkv, T, hd)
    v1 = torch.randn(2, 3, 4, 5)
    k2 = torch.randn(2, 3, 1, 5)
    v2 = torch.randn(2, 3, 1, 5)
    cache = tiny_decoder.KVCache()
    assert cache.length == 0
    k, v = cache.update(0, k1, v1)
    assert torch.equal(k, k1) and torch.equal(v, v1) and cache.length == 4
    k, v = cache.update(0, k2, v2)
    assert torch.equal(k, torch.cat((k1, k2), dim=2)) and torch.equal(v, torch.cat((v1, v2), dim=2))
    assert cache.length == 5
    # layers are independent: layer 1 starts empty and does not disturb layer 0
    k, v = cache.update(1, k2, v2)
    assert torch.equal(k, k2) and torch.equal(v, v2)
    k, _ = cache.update(0, k1[:, :, :0], v1[:, :, :0])
    assert torch.equal(k, torch.cat((k1, k2), dim=2)) and cache.length == 5


def test_inputs_embeds_that_are_no_token_embeddings_give_transformers_logits(ckpt, batch):
    """What the captioner feeds: vectors that are no row of the embedding table (visual tokens)."""
    hf, path, _ = ckpt
    ids, mask = batch
    embeds = torch.randn(*ids.shape, hf.config.hidden_size, generator=torch.Generator().manual_seed(3))
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = tiny_decoder.load(path)(inputs_embeds=embeds, attention_mask=mask)
        theirs = hf(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).logits
    assert max_diff(ours, theirs, mask) < LOGIT_TOL


def test_sharded_checkpoint(ckpt, batch, tmp_path):
    hf, path, _ = ckpt
    ids, mask = batch
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists() and not (tmp_path / "model.safetensors").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    with torch.no_grad():
        sharded = tiny_decoder.load(tmp_path)(ids, attention_mask=mask)
        single = tiny_decoder.load(path)(ids, attention_mask=mask)
    assert torch.equal(sharded, single)
    assert max_diff(sharded, hf_logits(hf, ids, mask), mask) < LOGIT_TOL


def test_hub_style_config(ckpt, batch, tmp_path):
    """The hub's Qwen3 config.json has a top-level rope_theta (and rope_scaling: null), no rope_parameters."""
    hf, path, _ = ckpt
    ids, mask = batch
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("rope_parameters")
    cfg.pop("layer_types", None)
    cfg.update(rope_theta=THETA, rope_scaling=None, torch_dtype="float32")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").symlink_to(path / "model.safetensors")
    model = tiny_decoder.load(tmp_path)
    assert model.cfg["rope_theta"] == THETA
    with torch.no_grad():
        hub = model(ids, attention_mask=mask)
        assert torch.equal(hub, tiny_decoder.load(path)(ids, attention_mask=mask))
    assert max_diff(hub, hf_logits(hf, ids, mask), mask) < LOGIT_TOL


def copy_with_weights(path, dst, edit):
    """Copy the checkpoint's config to dst and write its weights after `edit(weights)`."""
    (dst / "config.json").write_text((path / "config.json").read_text())
    weights = load_file(path / "model.safetensors")
    edit(weights)
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})


STORED_WEIGHTS = ["model.layers.0.self_attn.q_proj.weight", "model.layers.2.self_attn.k_norm.weight",
                  "model.embed_tokens.weight"]


@pytest.mark.parametrize("key", STORED_WEIGHTS)
def test_missing_weight_names_the_key(ckpt, tmp_path, key):
    _, path, _ = ckpt
    copy_with_weights(path, tmp_path, lambda w: w.pop(key))
    with pytest.raises(KeyError, match=f"missing weight {key}"):
        tiny_decoder.load(tmp_path)


def test_a_missing_untied_head_names_the_key(tmp_path):
    """An untied checkpoint must store lm_head.weight (a tied one never does)."""
    path = tmp_path / "untied"
    make_hf_model(tie=False).save_pretrained(path)
    copy_with_weights(path, tmp_path, lambda w: w.pop("lm_head.weight"))
    with pytest.raises(KeyError, match="missing weight lm_head.weight"):
        tiny_decoder.load(tmp_path)


def test_wrong_shape_and_unexpected_weight_are_loud(ckpt, tmp_path):
    _, path, _ = ckpt
    key = "model.layers.1.mlp.up_proj.weight"
    copy_with_weights(path, tmp_path, lambda w: w.update({key: w[key][:-1]}))
    with pytest.raises(ValueError, match=key):
        tiny_decoder.load(tmp_path)
    copy_with_weights(path, tmp_path, lambda w: w.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(96)}))
    with pytest.raises(ValueError, match="unexpected weights"):
        tiny_decoder.load(tmp_path)


def test_cli_prints_a_continuation(ckpt, tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    _, path, _ = ckpt
    for f in ("config.json", "model.safetensors"):
        (tmp_path / f).symlink_to(path / f)
    words = ["[UNK]", "the", "cat", "sat", "on", "a", "mat"]
    words += [f"w{i}" for i in range(VOCAB - len(words))]  # every id the model can emit decodes to a word
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    run = subprocess.run([sys.executable, str(ROOT / "tiny_decoder.py"), str(tmp_path), "the cat sat on",
                          "--max-new-tokens", "6"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    hf = ckpt[0]
    prompt = torch.tensor([[words.index(w) for w in ("the", "cat", "sat", "on")]])
    with torch.no_grad():
        greedy = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0]
    assert run.stdout.strip().split() == [words[i] for i in greedy.tolist()], run.stdout


def test_file_is_standalone():
    """Plain PyTorch: the only imports are the standard library, torch, safetensors and (for the CLI) tokenizers."""
    tree = ast.parse((ROOT / "tiny_decoder.py").read_text())
    modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    roots = {m.split(".")[0] for m in modules}
    assert roots <= {"argparse", "json", "pathlib", "torch", "safetensors", "tokenizers"}, roots
