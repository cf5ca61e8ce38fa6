import hashlib
import json
import subprocess
import sys
from pathlib import Path

import jinja2
import jinja2.ext
import numpy as np
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from orchestrator.sandbox import modelgen
from orchestrator.sandbox.modelgen import generate_tiny_qwen2

MODEL_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
}
DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_tiny_qwen2(tmp_path_factory.mktemp("gen") / "tiny-qwen2")


@pytest.fixture(scope="module")
def config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(model_dir / "tokenizer.json"))


def _digests(directory: Path) -> dict[str, str]:
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.iterdir())
    }


def _render(template: str, **context: object) -> str:
    """Render a chat template the way transformers' apply_chat_template does."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    # transformers replaces jinja's HTML-escaping, key-sorting tojson with plain json.dumps.
    env.filters["tojson"] = lambda value: json.dumps(value, ensure_ascii=False)
    return env.from_string(template).render(**context)


def test_config_describes_a_small_qwen2(config: dict, tokenizer: Tokenizer) -> None:
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert config["model_type"] == "qwen2"
    assert config["hidden_size"] == 128
    assert config["num_hidden_layers"] == 2
    assert config["num_attention_heads"] == 4
    assert config["num_key_value_heads"] == 2
    # vLLM's CPU attention dies on the first request below head_dim 32.
    assert config["hidden_size"] // config["num_attention_heads"] >= 32
    assert config["max_position_embeddings"] == 4096
    assert config["vocab_size"] == tokenizer.get_vocab_size(with_added_tokens=True)
    assert config["bos_token_id"] == tokenizer.token_to_id("<|endoftext|>")
    assert config["eos_token_id"] == tokenizer.token_to_id("<|im_end|>")
    assert config["torch_dtype"] == "float32"


def test_generation_config_stops_on_chatml_end(model_dir: Path, tokenizer: Tokenizer) -> None:
    generation = json.loads((model_dir / "generation_config.json").read_text())

    assert generation["eos_token_id"] == [
        tokenizer.token_to_id("<|im_end|>"),
        tokenizer.token_to_id("<|endoftext|>"),
    ]


def test_weights_have_every_qwen2_tensor_with_its_shape(model_dir: Path, config: dict) -> None:
    vocab, hidden, inter = config["vocab_size"], 128, config["intermediate_size"]
    head_dim = hidden // 4
    expected = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    for i in range(2):
        p = f"model.layers.{i}"
        expected |= {
            f"{p}.input_layernorm.weight": (hidden,),
            f"{p}.post_attention_layernorm.weight": (hidden,),
            f"{p}.self_attn.q_proj.weight": (4 * head_dim, hidden),
            f"{p}.self_attn.q_proj.bias": (4 * head_dim,),
            f"{p}.self_attn.k_proj.weight": (2 * head_dim, hidden),
            f"{p}.self_attn.k_proj.bias": (2 * head_dim,),
            f"{p}.self_attn.v_proj.weight": (2 * head_dim, hidden),
            f"{p}.self_attn.v_proj.bias": (2 * head_dim,),
            f"{p}.self_attn.o_proj.weight": (hidden, 4 * head_dim),
            f"{p}.mlp.gate_proj.weight": (inter, hidden),
            f"{p}.mlp.up_proj.weight": (inter, hidden),
            f"{p}.mlp.down_proj.weight": (hidden, inter),
        }

    tensors = load_file(model_dir / "model.safetensors")

    assert {name: t.shape for name, t in tensors.items()} == expected
    assert all(t.dtype == np.float32 and np.isfinite(t).all() for t in tensors.values())
    assert config["tie_word_embeddings"] is False


def test_random_model_cannot_pick_stop_or_unreadable_tokens(
    model_dir: Path, tokenizer: Tokenizer
) -> None:
    lm_head = load_file(model_dir / "model.safetensors")["lm_head.weight"]
    silent = {i for i in range(lm_head.shape[0]) if not lm_head[i].any()}

    for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>"):
        assert tokenizer.token_to_id(token) in silent
    assert set(tokenizer.encode("\x00\x07é").ids) <= silent  # control bytes, UTF-8 halves
    assert not set(tokenizer.encode("The answer is 42.\n").ids) & silent
    # Most of the vocabulary still speaks.
    assert len(silent) < lm_head.shape[0] // 4


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world! How are you today?",
        "def add(a: int, b: int) -> int:\n    return a + b\n",
        "  leading spaces, tabs\tand\r\nCRLF  ",
        "Unicode: 你好, 世界 — café, naïve, emoji 🚀",
        "",
    ],
)
def test_tokenizer_round_trips_text(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text).ids

    assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_tokenizer_learnt_merges_beyond_bytes(tokenizer: Tokenizer) -> None:
    assert len(tokenizer.encode("You are a helpful assistant.").ids) < 10


@pytest.mark.parametrize(
    "token", ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"]
)
def test_added_tokens_encode_as_one_token(tokenizer: Tokenizer, token: str) -> None:
    token_id = tokenizer.token_to_id(token)

    assert token_id is not None
    assert tokenizer.encode(f"a{token}b").ids.count(token_id) == 1
    assert tokenizer.encode(token).ids == [token_id]


def test_tokenizer_config_marks_chatml_tokens_special(
    model_dir: Path, tokenizer: Tokenizer
) -> None:
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    special_map = json.loads((model_dir / "special_tokens_map.json").read_text())
    added = tokenizer_config["added_tokens_decoder"]

    assert tokenizer_config["eos_token"] == "<|im_end|>"
    assert tokenizer_config["pad_token"] == "<|endoftext|>"
    assert tokenizer_config["bos_token"] is None
    assert tokenizer_config["tokenizer_class"] == "Qwen2Tokenizer"
    for token in modelgen.SPECIAL_TOKENS:
        assert added[str(tokenizer.token_to_id(token))]["special"] is True
    assert added[str(tokenizer.token_to_id("<tool_call>"))]["special"] is False
    assert special_map["eos_token"]["content"] == "<|im_end|>"


def test_chat_template_is_qwen2_5_instruct_verbatim(model_dir: Path) -> None:
    template = json.loads((model_dir / "tokenizer_config.json").read_text())["chat_template"]

    # sha256 of the chat_template in Qwen/Qwen2.5-*-Instruct's tokenizer_config.json.
    assert hashlib.sha256(template.encode()).hexdigest() == (
        "cd8e9439f0570856fd70470bf8889ebd8b5d1107207f67a5efb46e342330527f"
    )


def test_chat_template_renders_chatml_with_default_system_prompt(
    model_dir: Path, tokenizer: Tokenizer
) -> None:
    template = json.loads((model_dir / "tokenizer_config.json").read_text())["chat_template"]
    messages = [
        {"role": "user", "content": "Hello, how are you?"},
        {"role": "assistant", "content": "Fine, thanks."},
        {"role": "user", "content": "Tell me a joke."},
    ]

    prompt = _render(template, messages=messages, add_generation_prompt=True)

    assert prompt == (
        f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nHello, how are you?<|im_end|>\n"
        "<|im_start|>assistant\nFine, thanks.<|im_end|>\n"
        "<|im_start|>user\nTell me a joke.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = tokenizer.encode(prompt).ids
    assert ids.count(tokenizer.token_to_id("<|im_start|>")) == 5
    assert ids.count(tokenizer.token_to_id("<|im_end|>")) == 4


def test_chat_template_keeps_a_given_system_prompt(model_dir: Path) -> None:
    template = json.loads((model_dir / "tokenizer_config.json").read_text())["chat_template"]
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Hi"},
    ]

    prompt = _render(template, messages=messages, add_generation_prompt=False)

    assert prompt == (
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )


def test_chat_template_renders_tools_and_tool_calls(model_dir: Path) -> None:
    template = json.loads((model_dir / "tokenizer_config.json").read_text())["chat_template"]
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                }
            ],
        },
        {"role": "tool", "content": '{"celsius": 22}'},
    ]

    prompt = _render(template, messages=messages, tools=[tool], add_generation_prompt=True)

    assert prompt == (
        f"<|im_start|>system\n{DEFAULT_SYSTEM}\n\n# Tools\n\n"
        "You may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n"
        f"<tools>\n{json.dumps(tool)}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments "
        "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        "<|im_start|>assistant\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
        '<|im_start|>user\n<tool_response>\n{"celsius": 22}\n</tool_response><|im_end|>\n'
        "<|im_start|>assistant\n"
    )


def test_manifest_lists_every_model_file_with_size_and_sha256(model_dir: Path) -> None:
    manifest = json.loads((model_dir / "manifest.json").read_text())

    assert set(manifest["files"]) == MODEL_FILES
    for name, entry in manifest["files"].items():
        data = (model_dir / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_directory_is_small_and_readable_by_other_users(model_dir: Path) -> None:
    assert sum(p.stat().st_size for p in model_dir.iterdir()) < 3 * 1024 * 1024
    assert model_dir.stat().st_mode & 0o755 == 0o755


def test_same_seed_gives_identical_bytes(tmp_path: Path, model_dir: Path) -> None:
    again = generate_tiny_qwen2(tmp_path / "again")

    assert _digests(again) == _digests(model_dir)


def test_same_seed_gives_identical_bytes_in_another_process(
    tmp_path: Path, model_dir: Path
) -> None:
    # A fresh interpreter has new hash seeds (Python's and the Rust tokenizer's).
    code = (
        "import sys; from pathlib import Path; "
        "from orchestrator.sandbox.modelgen import generate_tiny_qwen2; "
        "generate_tiny_qwen2(Path(sys.argv[1]))"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "other")], check=True)

    assert _digests(tmp_path / "other") == _digests(model_dir)


def test_another_seed_changes_only_the_weights(tmp_path: Path, model_dir: Path) -> None:
    other = _digests(generate_tiny_qwen2(tmp_path / "seed1", seed=1))
    base = _digests(model_dir)

    changed = {name for name in base if base[name] != other[name]}
    assert changed == {"model.safetensors", "manifest.json", modelgen.MARKER_FILE}


def test_second_call_does_not_rewrite(tmp_path: Path) -> None:
    out = generate_tiny_qwen2(tmp_path / "m")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    assert generate_tiny_qwen2(tmp_path / "m") == out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_other_seed_or_damaged_file_is_regenerated(tmp_path: Path) -> None:
    out = generate_tiny_qwen2(tmp_path / "m")
    good = _digests(out)

    generate_tiny_qwen2(out, seed=1)
    assert _digests(out) != good

    generate_tiny_qwen2(out)
    assert _digests(out) == good

    (out / "model.safetensors").write_bytes(b"truncated")
    generate_tiny_qwen2(out)
    assert _digests(out) == good
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_refuses_to_replace_a_directory_it_did_not_make(tmp_path: Path) -> None:
    foreign = tmp_path / "m"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")

    with pytest.raises(FileExistsError):
        generate_tiny_qwen2(foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
