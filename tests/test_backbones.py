import pytest

from speechlm_bridge.backbones import BACKBONE_FAMILIES, apply_legacy_renames, backbone_family_for
from speechlm_bridge.errors import ConfigError


@pytest.mark.parametrize(
    ("architecture", "family"),
    [
        ("Qwen3ForCausalLM", "dense-decoder"),
        ("Qwen2ForCausalLM", "dense-decoder"),
        ("LlamaForCausalLM", "dense-decoder"),
        ("NemotronHForCausalLM", "hybrid-mamba"),
    ],
)
def test_family_from_architectures(architecture, family):
    assert backbone_family_for({"architectures": [architecture]}).name == family


def test_family_missing_architectures_names_file():
    with pytest.raises(ConfigError, match=r"backbone/config.json has no `architectures`.*Qwen3ForCausalLM"):
        backbone_family_for({"model_type": "qwen3"}, source="backbone/config.json")


def test_family_unknown_architecture_lists_supported():
    with pytest.raises(ConfigError, match=r"FalconForCausalLM.*Supported causal LMs: .*LlamaForCausalLM"):
        backbone_family_for({"architectures": ["FalconForCausalLM"]})


def test_families_do_not_share_architectures():
    names = [name for family in BACKBONE_FAMILIES for name in family.architectures]
    assert len(names) == len(set(names))


def test_legacy_renames_nemotron_h():
    family = backbone_family_for({"architectures": ["NemotronHForCausalLM"]})
    renamed = apply_legacy_renames({"backbone.embeddings.weight": 1, "lm_head.weight": 2}, family)
    assert renamed == {"model.embeddings.weight": 1, "lm_head.weight": 2}
