"""read_nemo_archive: archive variants and hostile or broken archives."""

from __future__ import annotations

import io
import tarfile

import pytest
import torch

from speechlm_bridge.checkpoints import read_nemo_archive
from speechlm_bridge.errors import CheckpointError

CONFIG = "model_config.yaml"
WEIGHTS = "model_weights.ckpt"


@pytest.fixture
def members(nemo_salm_dir) -> dict[str, bytes]:
    """The two members of the fixture ASR archive, by bare name."""
    with tarfile.open(nemo_salm_dir / "asr" / "tiny-fastconformer-ctc.nemo") as archive:
        return {name: archive.extractfile(f"./{name}").read() for name in (CONFIG, WEIGHTS)}


def write_tar(path, entries: list[tarfile.TarInfo | tuple[str, bytes]], mode: str = "w") -> None:
    with tarfile.open(path, mode) as archive:
        for entry in entries:
            if isinstance(entry, tarfile.TarInfo):
                archive.addfile(entry)
            else:
                name, data = entry
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))


def test_gzip_archive_with_bare_names(tmp_path, members):
    path = tmp_path / "asr.nemo"
    write_tar(path, [(CONFIG, members[CONFIG]), (WEIGHTS, members[WEIGHTS])], mode="w:gz")

    archive = read_nemo_archive(path)

    assert archive.config["encoder"]["n_layers"] == 2
    assert archive.path == path
    assert len(archive.state_dict) == 96
    assert isinstance(archive.state_dict["encoder.layers.1.norm_out.weight"], torch.Tensor)


def test_traversal_members_never_extracted(tmp_path, members):
    work = tmp_path / "work"
    work.mkdir()
    path = work / "asr.nemo"
    write_tar(
        path,
        [
            ("../escaped.txt", b"outside"),
            (f"../{CONFIG}", b"a: 1\n"),
            (f"./{CONFIG}", members[CONFIG]),
            (f"./{WEIGHTS}", members[WEIGHTS]),
        ],
    )

    archive = read_nemo_archive(path)

    assert not (tmp_path / "escaped.txt").exists()
    assert not (tmp_path / CONFIG).exists()
    assert archive.config["preprocessor"]["n_fft"] == 512


def test_symlink_member_rejected(tmp_path, members):
    link = tarfile.TarInfo(f"./{CONFIG}")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    path = tmp_path / "asr.nemo"
    write_tar(path, [link, (f"./{WEIGHTS}", members[WEIGHTS])])

    with pytest.raises(CheckpointError, match=rf"lacks {CONFIG} at its top level"):
        read_nemo_archive(path)


def test_distributed_archive_rejected(tmp_path, members):
    path = tmp_path / "megatron.nemo"
    write_tar(path, [(f"./{CONFIG}", members[CONFIG]), ("./model_weights/common.pt", b"x")])

    with pytest.raises(CheckpointError, match=rf"lacks {WEIGHTS} at its top level .*Megatron distributed"):
        read_nemo_archive(path)


def test_not_a_tar(tmp_path):
    path = tmp_path / "asr.nemo"
    path.write_bytes(b"not a tar archive at all" * 40)

    with pytest.raises(CheckpointError, match=r"Cannot read .*asr\.nemo as a `\.nemo` tar archive"):
        read_nemo_archive(path)


def test_missing_archive(tmp_path):
    with pytest.raises(CheckpointError, match=r"NeMo archive .*absent\.nemo not found"):
        read_nemo_archive(tmp_path / "absent.nemo")


def test_config_not_a_mapping(tmp_path, members):
    path = tmp_path / "asr.nemo"
    write_tar(path, [(CONFIG, b"- just\n- a list\n"), (WEIGHTS, members[WEIGHTS])])

    with pytest.raises(CheckpointError, match=rf"{CONFIG} in .*asr\.nemo is a list, expected a mapping"):
        read_nemo_archive(path)


def test_truncated_weights_member(tmp_path, members):
    path = tmp_path / "asr.nemo"
    write_tar(path, [(CONFIG, members[CONFIG]), (WEIGHTS, members[WEIGHTS][:5000])])

    with pytest.raises(CheckpointError, match=rf"{WEIGHTS} in .*asr\.nemo: Cannot read .* truncated"):
        read_nemo_archive(path)
