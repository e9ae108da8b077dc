import json
import shutil

import pytest
from transformers import AutoTokenizer

from speechlm_bridge.errors import ConfigError
from speechlm_bridge.export.tokenizer import export_tokenizer, read_chat_template

TAG = "<|audio|>"
DIALOGS = [
    [{"role": "user", "content": f"Transcribe the following: {TAG}"}],
    [
        {"role": "system", "content": "You are a helpful transcriber."},
        {"role": "user", "content": f"Transcribe the following: {TAG}"},
        {"role": "assistant", "content": "<think>\nshort\n</think>\n\nhello world"},
        {"role": "user", "content": "  And again, in ünïcödé?  "},
    ],
]


@pytest.fixture(params=["qwen3", "qwen2.5"])
def backbone_dir(request, backbones_dir):
    return backbones_dir / request.param


def test_export_keeps_template_bytes(backbone_dir, tmp_path):
    result = export_tokenizer(backbone_dir, tmp_path, audio_locator_tag=TAG)
    source_template = json.loads((backbone_dir / "tokenizer_config.json").read_text())["chat_template"]
    written = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert written["chat_template"] == source_template
    assert result.chat_template == source_template
    assert not (tmp_path / "chat_template.jinja").exists()


def test_export_config_is_portable(backbone_dir, tmp_path):
    export_tokenizer(backbone_dir, tmp_path, audio_locator_tag=TAG)
    written = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert written["tokenizer_class"] == "Qwen2Tokenizer"
    assert written["extra_special_tokens"] == {"audio_token": TAG}
    assert "<|im_start|>" in written["additional_special_tokens"]
    assert "local_files_only" not in written


def test_export_adds_tag_as_one_special_token(backbone_dir, tmp_path):
    base = AutoTokenizer.from_pretrained(backbone_dir)
    result = export_tokenizer(backbone_dir, tmp_path, audio_locator_tag=TAG)
    assert result.audio_token_id == len(base)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.encode(f"x{TAG}y", add_special_tokens=False).count(result.audio_token_id) == 1
    assert TAG in reloaded.all_special_tokens
    assert reloaded.audio_token == TAG
    assert len(reloaded) == len(base) + 1


def test_export_renders_dialogs_like_backbone(backbone_dir, tmp_path):
    export_tokenizer(backbone_dir, tmp_path, audio_locator_tag=TAG)
    base = AutoTokenizer.from_pretrained(backbone_dir)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    for dialog in DIALOGS:
        for kwargs in ({"add_generation_prompt": True}, {"add_generation_prompt": False}):
            expected = base.apply_chat_template(dialog, tokenize=False, **kwargs)
            assert reloaded.apply_chat_template(dialog, tokenize=False, **kwargs) == expected
            text_ids = base.encode(expected.replace(TAG, ""), add_special_tokens=False)
            assert reloaded.encode(expected.replace(TAG, ""), add_special_tokens=False) == text_ids


def test_qwen3_tag_id_matches_nemo(backbones_dir, tmp_path):
    # NeMo's SALM gave <|audio|> id 151669 on the Qwen3 tokenizer.
    result = export_tokenizer(backbones_dir / "qwen3", tmp_path, audio_locator_tag=TAG)
    assert result.audio_token_id == 151669


def test_existing_tag_keeps_id(nemo_salm_dir, tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(nemo_salm_dir / "to_hf" / "from_ckpt" / name, source / name)
    result = export_tokenizer(source, tmp_path / "out", audio_locator_tag=TAG)
    assert result.audio_token_id == 151669
    assert not result.added_audio_token


def test_separate_template_file_wins(backbones_dir, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(backbones_dir / "qwen3", source)
    (source / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert read_chat_template(source) == "{{ messages[0]['content'] }}"
    export_tokenizer(source, tmp_path / "out", audio_locator_tag=TAG)
    written = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert written["chat_template"] == "{{ messages[0]['content'] }}"


def test_tag_splitting_into_pieces_rejected(backbones_dir, tmp_path):
    with pytest.raises(ConfigError, match="does not encode as one token"):
        export_tokenizer(backbones_dir / "qwen3", tmp_path, audio_locator_tag="")


def test_missing_tokenizer_dir(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="cannot load the backbone tokenizer"):
        export_tokenizer(tmp_path, tmp_path / "out", audio_locator_tag=TAG)
