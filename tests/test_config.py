"""Config: .env is read, real environment variables win, --env-file picks another file, and
.env.example documents every variable with its default."""
import dataclasses
import sys

import pytest
from dotenv import dotenv_values

import multimodal_transfer_learning as mtl
from conftest import ROOT


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


def test_public_config_has_no_secrets(tmp_path):
    cfg = mtl.load_config({"HF_TOKEN": "hf_secret123", "WANDB_API_KEY": "wandbsecret456",
                           "OUTPUT_DIR_MODELS": str(tmp_path / "m"), "CACHE_DIR": str(tmp_path / "c")})
    public = repr(cfg.public()) + repr(cfg)
    assert "hf_secret123" not in public and "wandbsecret456" not in public
    assert sorted(cfg.secrets()) == ["hf_secret123", "wandbsecret456"]


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


def test_dtype_auto_is_fp32_on_cpu(tmp_path):
    cfg = mtl.load_config({"DEVICE": "cpu", "OUTPUT_DIR_MODELS": str(tmp_path / "m"), "CACHE_DIR": str(tmp_path / "c")})
    assert mtl.resolve_device(cfg) == (mtl.torch.device("cpu"), mtl.torch.float32)
    cfg = mtl.load_config({"DEVICE": "cpu", "DTYPE": "bf16", "OUTPUT_DIR_MODELS": str(tmp_path / "m"),
                           "CACHE_DIR": str(tmp_path / "c")})
    assert mtl.resolve_device(cfg)[1] == mtl.torch.bfloat16


# ---- TUNING=lora and QLORA=1: optional packages and a GPU, judged before any download ----

def dirs(tmp_path) -> dict[str, str]:
    return {"OUTPUT_DIR_MODELS": str(tmp_path / "m"), "CACHE_DIR": str(tmp_path / "c")}


def test_qlora_needs_tuning_lora(tmp_path):
    with pytest.raises(mtl.UserError) as err:
        mtl.load_config({"QLORA": "1", **dirs(tmp_path)})
    assert err.value.exit_code == 2 and "QLORA=1 needs TUNING=lora" in str(err.value)


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_qlora_without_a_cuda_gpu_is_refused_saying_why(tmp_path, device):
    if device == "auto" and mtl.torch.cuda.is_available():
        pytest.skip("DEVICE=auto picks the GPU here")
    cfg = mtl.load_config({"TUNING": "lora", "QLORA": "1", "DEVICE": device, **dirs(tmp_path)})
    with pytest.raises(mtl.UserError) as err:
        mtl.resolve_device(cfg)
    assert err.value.exit_code == 2 and "QLORA=1 needs a CUDA GPU" in str(err.value) and "\n" not in str(err.value)


def test_a_qlora_checkpoint_is_refused_on_cpu_before_its_lm_is_fetched(tmp_path):
    """--test and --caption rebuild the model from the checkpoint's config, QLORA=1 included."""
    cfg = mtl.load_config({"DEVICE": "cpu", **dirs(tmp_path)})
    stored = {**cfg.public(), "tuning": "lora", "qlora": True, "lm_model": "nobody/not-cached-anywhere"}
    path = tmp_path / "2_clip_lora16.pt"
    mtl.torch.save({"format": 1, "model": {}, "config": stored, "epoch": 2, "step": 10, "metrics": {}}, path)
    with pytest.raises(mtl.UserError) as err:
        mtl.load_trained(cfg, mtl.argparse.Namespace(checkpoint=str(path)))
    assert err.value.exit_code == 2 and "QLORA=1 needs a CUDA GPU" in str(err.value)


def test_lora_without_peft_is_refused_with_the_install_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # what `import peft` meets where it is not installed
    topk = mtl.load_config({"DEVICE": "cpu", **dirs(tmp_path)})
    assert mtl.resolve_device(topk)[0].type == "cpu"  # the default recipe does not need it
    with pytest.raises(mtl.UserError) as err:
        mtl.resolve_device(dataclasses.replace(topk, tuning="lora"))
    assert err.value.exit_code == 2 and "TUNING=lora" in str(err.value) and "pip install peft" in str(err.value)
