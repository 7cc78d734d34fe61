"""Config: where values come from (.env, the real environment, --env-file), the documented
defaults, every bad value refused before any work with a message that names the variable, the value
and what is allowed, secrets kept out of everything public, and the command-line options."""
from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

import pytest
from dotenv import dotenv_values

import multimodal_transfer_learning as mtl
from conftest import HF_FAKE, ROOT, WANDB_FAKE


def minimal_env(tmp_path: Path, **values) -> dict[str, str]:
    return {"OUTPUT_DIR_MODELS": str(tmp_path / "models"), "CACHE_DIR": str(tmp_path / "cache"), **values}


# ---------------------------------------------------------------------------------------------
# Where values come from, and their defaults
# ---------------------------------------------------------------------------------------------

def test_env_file_is_read_and_environment_overrides_it(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text("TOP_K=5\nEPOCHS=7\nPROMPT=\"Describe:\"\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EPOCHS", "2")
    for key in ("TOP_K", "PROMPT"):
        monkeypatch.delenv(key, raising=False)
    cfg = mtl.load_config(mtl.read_environment(None, demo=False))
    assert (cfg.top_k, cfg.epochs, cfg.prompt) == (5, 2, "Describe:")


def test_env_file_option_reads_another_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("TOP_K=5\n")
    (tmp_path / "ablation.env").write_text("TOP_K=0\nVISION_ENCODER=vit\n")
    monkeypatch.delenv("TOP_K", raising=False)
    monkeypatch.delenv("VISION_ENCODER", raising=False)
    cfg = mtl.load_config(mtl.read_environment(str(tmp_path / "ablation.env"), demo=False))
    assert (cfg.top_k, cfg.vision_encoder, cfg.vision_model_id) == (0, "vit", "google/vit-base-patch16-224-in21k")


def test_defaults_follow_the_spec(tmp_path):
    cfg = mtl.load_config({"OUTPUT_DIR_MODELS": str(tmp_path / "m"), "CACHE_DIR": str(tmp_path / "c")})
    assert (cfg.vision_encoder, cfg.lm_model, cfg.top_k, cfg.num_visual_tokens) == ("clip", "Qwen/Qwen3-0.6B-Base", 3, 16)
    assert (cfg.batch_size, cfg.epochs, cfg.seed, cfg.decoding, cfg.max_new_tokens) == (32, 3, 42, "greedy", 32)
    assert cfg.vision_model_id == "openai/clip-vit-base-patch32"
    assert cfg.wandb_project == "mlx8-w4-multimodal-transferlearning"


def test_env_example_documents_every_variable_with_its_default():
    example = dotenv_values(ROOT / ".env.example")
    text = (ROOT / ".env.example").read_text()
    for f in dataclasses.fields(mtl.Config):
        key = f.name.upper()
        assert key in example, f"{key} missing from .env.example"
        default = f.default if not isinstance(f.default, bool) else str(int(f.default))
        assert example[key] == str(default), key
        assert f.metadata["help"] in text, f"{key}'s help text missing"


# ---------------------------------------------------------------------------------------------
# Validation before any work
# ---------------------------------------------------------------------------------------------

BAD_VALUES = [
    ("TOP_K", "-1"), ("TOP_K", "two"), ("NUM_VISUAL_TOKENS", "0"), ("ADAPTER_HIDDEN", "-16"),
    ("MAX_CAPTION_TOKENS", "0"), ("BATCH_SIZE", "0"), ("BATCH_SIZE", "8.5"), ("GRAD_ACCUM", "0"), ("EPOCHS", "0"),
    ("EPOCHS", "three"), ("LR_ADAPTER", "0"), ("LR_ADAPTER", "-1e-3"), ("LR_QWEN", "nan"), ("LR_QWEN", "inf"),
    ("LR_QWEN", "fast"), ("WEIGHT_DECAY", "-0.1"), ("WARMUP_RATIO", "1"), ("GRAD_CLIP", "-1"), ("SEED", "-1"),
    ("SEED", str(2**63)), ("EVAL_BATCH_SIZE", "0"), ("VAL_CAPTION_IMAGES", "-1"), ("RETRIEVAL_POOL", "-3"),
    ("MAX_IMAGES", "-5"), ("MAX_BAD_FRACTION", "1.5"), ("MAX_BAD_FRACTION", "-0.1"), ("VISION_ENCODER", "resnet"),
    ("DECODING", "nucleus"), ("NUM_BEAMS", "0"), ("SAMPLE_TOP_K", "-1"), ("TEMPERATURE", "0"), ("TOP_P", "0"),
    ("TOP_P", "1.5"), ("NO_REPEAT_NGRAM", "-1"), ("MAX_NEW_TOKENS", "0"), ("DEVICE", "gpu"), ("DTYPE", "fp16"),
    ("NUM_WORKERS", "-2"), ("LOG_EVERY", "0"), ("LOG_LEVEL", "LOUD"), ("WANDB_MODE", "sometimes"),
    ("TRUST_REMOTE_CODE", "maybe"), ("COMPILE", "please"), ("DEMO_IMAGES", "0"), ("DATASET", ""),
    ("OUTPUT_DIR_MODELS", "{file}/models"), ("CACHE_DIR", "{file}/cache"),
]
EXPLAINS = re.compile(r"allowed|must be|is not (an integer|a number|a finite number|a boolean|writable)|is empty")


def _is_number(value: str) -> bool:
    try:
        float(value)
        return True
    except ValueError:
        return False


@pytest.mark.parametrize("var,value", BAD_VALUES, ids=[f"{k}={v}" for k, v in BAD_VALUES])
def test_bad_value_is_refused_naming_variable_value_and_what_is_allowed(tmp_path, var, value):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    value = value.format(file=a_file)
    with pytest.raises(mtl.UserError) as err:
        mtl.load_config(minimal_env(tmp_path, **{var: value}))
    message = str(err.value)
    assert err.value.exit_code == 2
    assert var in message, message
    assert value in message or (_is_number(value) and repr(float(value)) in message), message  # as typed or parsed
    line = next(line for line in message.splitlines() if var in line)
    assert EXPLAINS.search(line), f"the message does not say what is allowed: {line}"


# (variable, value as typed, the value the config must hold)
ALLOWED_EDGE_VALUES = [
    ("TOP_K", "0", 0), ("MAX_BAD_FRACTION", "0", 0.0), ("WARMUP_RATIO", "0", 0.0), ("SEED", "0", 0),
    ("SEED", str(2**32 - 1), 4294967295), ("LOG_LEVEL", "debug", "DEBUG"), ("WANDB_MODE", "disabled", "disabled"),
    ("DEVICE", "cuda:1", "cuda:1"), ("PROMPT", "", ""), ("TRUST_REMOTE_CODE", "1", True),
    ("HF_TOKEN", HF_FAKE, HF_FAKE),
]


@pytest.mark.parametrize("var,value,expected", ALLOWED_EDGE_VALUES,
                         ids=[f"{k}={v}" for k, v, _ in ALLOWED_EDGE_VALUES])
def test_edge_values_that_are_allowed_pass(tmp_path, var, value, expected):
    cfg = mtl.load_config(minimal_env(tmp_path, **{var: value}))
    parsed = getattr(cfg, var.lower())
    assert parsed == expected and type(parsed) is type(expected), (parsed, expected)


def test_several_bad_values_are_reported_together_in_process(tmp_path):
    with pytest.raises(mtl.UserError) as err:
        mtl.load_config(minimal_env(tmp_path, EPOCHS="0", DECODING="topk", LR_QWEN="x"))
    assert all(s in str(err.value) for s in ("EPOCHS=0", "DECODING='topk'", "LR_QWEN='x'")), str(err.value)


def test_top_k_is_checked_against_the_lm_once_its_config_is_known(config_from_env):
    cfg = config_from_env(top_k=3)
    layers = mtl.read_lm_config(cfg).num_hidden_layers  # the fixture LM's config.json only
    assert layers == 2
    mtl.check_top_k(config_from_env(top_k=2), layers)  # 2 of 2 blocks: allowed
    with pytest.raises(mtl.UserError) as err:
        mtl.check_top_k(cfg, layers)
    assert err.value.exit_code == 2 and "TOP_K=3" in str(err.value) and "0..2" in str(err.value)


# ---------------------------------------------------------------------------------------------
# Secrets
# ---------------------------------------------------------------------------------------------

def test_public_config_has_no_secrets(tmp_path):
    cfg = mtl.load_config({"HF_TOKEN": "hf_secret123", "WANDB_API_KEY": "wandbsecret456",
                           "OUTPUT_DIR_MODELS": str(tmp_path / "m"), "CACHE_DIR": str(tmp_path / "c")})
    public = repr(cfg.public()) + repr(cfg)
    assert "hf_secret123" not in public and "wandbsecret456" not in public
    assert sorted(cfg.secrets()) == ["hf_secret123", "wandbsecret456"]


@pytest.mark.parametrize("var,value", [("HF_TOKEN", HF_FAKE[:12] + " " + HF_FAKE[12:]),
                                       ("WANDB_API_KEY", f'"{WANDB_FAKE}"')])
def test_bad_secret_is_refused_without_echoing_it(tmp_path, var, value):
    with pytest.raises(mtl.UserError) as err:
        mtl.load_config(minimal_env(tmp_path, **{var: value}))
    assert err.value.exit_code == 2 and var in str(err.value)
    assert HF_FAKE[:12] not in str(err.value) and WANDB_FAKE[:12] not in str(err.value), str(err.value)


# ---------------------------------------------------------------------------------------------
# Command-line options
# ---------------------------------------------------------------------------------------------

def test_help_lists_options_and_variables(capsys):
    with pytest.raises(SystemExit) as e:
        mtl.parse_args(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for word in ("--train", "--test", "--caption", "--env-file", "--checkpoint", "--resume", "--demo", "TOP_K",
                 "LR_ADAPTER", "DECODING"):
        assert word in out


@pytest.mark.parametrize("argv", [[], ["--train", "--test"], ["--test", "--resume"]])
def test_exactly_one_job_is_required(argv):
    with pytest.raises(SystemExit) as e:
        mtl.parse_args(argv)
    assert e.value.code == 2


# ---------------------------------------------------------------------------------------------
# TUNING=lora and QLORA=1: optional packages and a GPU, judged before any download
# ---------------------------------------------------------------------------------------------

def test_qlora_needs_tuning_lora(tmp_path):
    with pytest.raises(mtl.UserError) as err:
        mtl.load_config(minimal_env(tmp_path, QLORA="1"))
    assert err.value.exit_code == 2 and "QLORA=1 needs TUNING=lora" in str(err.value)


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_qlora_without_a_cuda_gpu_is_refused_saying_why(tmp_path, device):
    if device == "auto" and mtl.torch.cuda.is_available():
        pytest.skip("DEVICE=auto picks the GPU here")
    cfg = mtl.load_config(minimal_env(tmp_path, TUNING="lora", QLORA="1", DEVICE=device))
    with pytest.raises(mtl.UserError) as err:
        mtl.resolve_device(cfg)
    assert err.value.exit_code == 2 and "QLORA=1 needs a CUDA GPU" in str(err.value) and "\n" not in str(err.value)


def test_a_qlora_checkpoint_is_refused_on_cpu_before_its_lm_is_fetched(tmp_path):
    """--test and --caption rebuild the model from the checkpoint's config, QLORA=1 included."""
    cfg = mtl.load_config(minimal_env(tmp_path, DEVICE="cpu"))
    stored = {**cfg.public(), "tuning": "lora", "qlora": True, "lm_model": "nobody/not-cached-anywhere"}
    path = tmp_path / "2_clip_lora16.pt"
    mtl.torch.save({"format": 1, "model": {}, "config": stored, "epoch": 2, "step": 10, "metrics": {}}, path)
    with pytest.raises(mtl.UserError) as err:
        mtl.load_trained(cfg, str(path))
    assert err.value.exit_code == 2 and "QLORA=1 needs a CUDA GPU" in str(err.value)


def test_lora_without_peft_is_refused_with_the_install_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # what `import peft` meets where it is not installed
    topk = mtl.load_config(minimal_env(tmp_path, DEVICE="cpu"))
    assert mtl.resolve_device(topk)[0].type == "cpu"  # the default recipe does not need it
    with pytest.raises(mtl.UserError) as err:
        mtl.resolve_device(dataclasses.replace(topk, tuning="lora"))
    assert err.value.exit_code == 2 and "TUNING=lora" in str(err.value) and "pip install peft" in str(err.value)
