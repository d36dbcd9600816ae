"""Safe extraction: round trips for tar, tar.gz and zip; every hostile member kind refused by name."""

from __future__ import annotations

import hashlib
import io
import stat
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from ctxrepro.data.extract import BrokenArchiveError, UnsafeArchiveError, archive_kind, extract_archive, member_parts

FILES = {"top.txt": b"hello\n", "VOCdevkit/VOC2007/JPEGImages/000001.jpg": b"\xff\xd8fake-jpeg",
         "VOCdevkit/VOC2007/Annotations/000001.xml": b"<annotation/>", "deep/a/b/c.PNG": b"\x89PNG" + bytes(100)}


def _tar_member(tf: tarfile.TarFile, name: str, data: bytes = b"", *, kind: bytes = tarfile.REGTYPE,
                linkname: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size, info.mode = kind, linkname, len(data), 0o644
    tf.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def make_tar(path: Path, members: list[tuple], mode: str = "w") -> Path:
    """members: (name, data) for files, or (name, kind, linkname) for links and special files."""
    with tarfile.open(path, mode) as tf:
        for m in members:
            if len(m) == 2:
                _tar_member(tf, m[0], m[1])
            else:
                _tar_member(tf, m[0], kind=m[1], linkname=m[2])
    return path


def make_zip(path: Path, members: list[tuple]) -> Path:
    """members: (name, data) for files, or (name, unix mode bits, data) to set the entry's type."""
    with zipfile.ZipFile(path, "w") as zf:
        for m in members:
            info = zipfile.ZipInfo(m[0])
            if len(m) == 3:
                info.external_attr = m[1] << 16
            zf.writestr(info, m[-1])
    return path


def _read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("suffix,mode", [(".tar", "w"), (".tar.gz", "w:gz"), (".tgz", "w:gz")])
def test_tar_round_trip_with_counts_and_digest(tmp_path, suffix, mode):
    archive = make_tar(tmp_path / f"a{suffix}", [("./", tarfile.DIRTYPE, "")] + sorted(FILES.items()), mode)
    got = extract_archive(archive, tmp_path / "out", algos=("md5", "sha256"))
    assert _read_tree(tmp_path / "out") == FILES
    assert (got.tally.files, got.tally.bytes, got.tally.images) == (4, sum(map(len, FILES.values())), 2)
    raw = archive.read_bytes()
    assert got.size == len(raw)
    assert got.digests == {"md5": hashlib.md5(raw).hexdigest(), "sha256": hashlib.sha256(raw).hexdigest()}


def test_zip_round_trip(tmp_path):
    archive = make_zip(tmp_path / "a.zip", sorted(FILES.items()))
    got = extract_archive(archive, tmp_path / "out", algos=("md5",))
    assert _read_tree(tmp_path / "out") == FILES
    assert got.digests["md5"] == hashlib.md5(archive.read_bytes()).hexdigest()
    assert got.tally.images == 2


def test_links_that_stay_inside_are_extracted(tmp_path):
    archive = make_tar(tmp_path / "a.tar", [("d/f.txt", b"x" * 7), ("d/alias", tarfile.SYMTYPE, "f.txt"),
                                             ("up", tarfile.SYMTYPE, "d/f.txt"),
                                             ("e/back", tarfile.SYMTYPE, "../d/f.txt"),
                                             ("hard.txt", tarfile.LNKTYPE, "d/f.txt")])
    got = extract_archive(archive, tmp_path / "out")
    out = tmp_path / "out"
    assert (out / "d/alias").is_symlink() and (out / "d/alias").read_bytes() == b"x" * 7
    assert (out / "e/back").read_bytes() == b"x" * 7
    assert (out / "hard.txt").stat().st_ino == (out / "d/f.txt").stat().st_ino
    assert got.tally.files == 2  # the regular file and its hard link


HOSTILE_TARS = {
    "absolute path": [("ok.txt", b"1"), ("/tmp/ctxrepro-evil.txt", b"x")],
    "dotdot": [("ok.txt", b"1"), ("a/../../evil.txt", b"x")],
    "symlink out (relative)": [("ok.txt", b"1"), ("link", tarfile.SYMTYPE, "../../outside")],
    "symlink out (absolute)": [("link", tarfile.SYMTYPE, "/etc")],
    "symlink climbing through a link": [("a", tarfile.SYMTYPE, "."), ("b", tarfile.SYMTYPE, "a/../..")],
    "write through a symlink": [("sub/", tarfile.DIRTYPE, ""), ("link", tarfile.SYMTYPE, "sub"),
                                ("link/x.txt", b"x")],
    "hardlink out": [("ok.txt", b"1"), ("hard", tarfile.LNKTYPE, "../../etc/passwd")],
    "hardlink absolute": [("hard", tarfile.LNKTYPE, "/etc/passwd")],
    "hardlink to a later member": [("hard", tarfile.LNKTYPE, "later.txt"), ("later.txt", b"x")],
    "device file": [("dev", tarfile.CHRTYPE, "")],
    "fifo": [("pipe", tarfile.FIFOTYPE, "")],
}
BAD_MEMBER = {"absolute path": "/tmp/ctxrepro-evil.txt", "dotdot": "a/../../evil.txt", "symlink out (relative)": "link",
              "symlink out (absolute)": "link", "symlink climbing through a link": "b",
              "write through a symlink": "link/x.txt", "hardlink out": "hard", "hardlink absolute": "hard",
              "hardlink to a later member": "hard", "device file": "dev", "fifo": "pipe"}


@pytest.mark.parametrize("case", sorted(HOSTILE_TARS))
def test_hostile_tar_members_are_refused_by_name(tmp_path, case):
    archive = make_tar(tmp_path / "evil.tar", HOSTILE_TARS[case])
    out = tmp_path / "x" / "y" / "out"
    with pytest.raises(UnsafeArchiveError) as err:
        extract_archive(archive, out)
    assert err.value.member == BAD_MEMBER[case]
    assert repr(BAD_MEMBER[case]) in str(err.value) and "evil.tar" in str(err.value)
    # Nothing escaped: the only files anywhere under tmp_path are the archive and, at most, ok.txt / sub.
    written = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if not p.is_dir()}
    assert written <= {"evil.tar", "x/y/out/ok.txt", "x/y/out/a", "x/y/out/link"}
    assert not Path("/tmp/ctxrepro-evil.txt").exists()


HOSTILE_ZIPS = {
    "dotdot": ([("ok.txt", b"1"), ("../evil.txt", b"x")], "../evil.txt"),
    "absolute path": ([("/abs/evil.txt", b"x")], "/abs/evil.txt"),
    "symlink out": ([("link", stat.S_IFLNK | 0o777, b"../../etc")], "link"),
    "device file": ([("dev", stat.S_IFCHR | 0o600, b"")], "dev"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_ZIPS))
def test_hostile_zip_members_are_refused_by_name(tmp_path, case):
    members, bad = HOSTILE_ZIPS[case]
    archive = make_zip(tmp_path / "evil.zip", members)
    with pytest.raises(UnsafeArchiveError) as err:
        extract_archive(archive, tmp_path / "out")
    assert err.value.member == bad and "evil.zip" in str(err.value)
    assert not (tmp_path / "evil.txt").exists() and not list((tmp_path / "out").rglob("link"))


def test_member_parts_and_archive_kind():
    assert member_parts("./a/./b.jpg", "t") == ("a", "b.jpg")
    assert member_parts("./", "t") == ()
    with pytest.raises(UnsafeArchiveError, match="absolute"):
        member_parts("C:/x", "t")
    with pytest.raises(UnsafeArchiveError, match=r"'\.\.'"):
        member_parts("a\\..\\..\\b", "t")
    assert [archive_kind(Path(n)) for n in ("a.tar", "b.TGZ", "c.tar.gz", "d.zip")] == ["tar", "tar", "tar", "zip"]
    with pytest.raises(ValueError, match="not a known archive type"):
        archive_kind(Path("x.rar"))


def _member_offsets(data: bytes) -> list[int]:
    """Where each member's header starts (a cut there ends the tar exactly at a member boundary)."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return [m.offset for m in tf.getmembers()]


def _broken_tars() -> dict[str, bytes]:
    members = sorted(FILES.items())
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, content in members:
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tf.addfile(info, io.BytesIO(content))
    data = buf.getvalue()
    offsets = _member_offsets(data)
    gz = io.BytesIO()
    with tarfile.open(fileobj=gz, mode="w:gz") as tf:
        tf.addfile(tarfile.TarInfo("x"), io.BytesIO(b""))
    return {"boundary": data[:offsets[2]], "mid-member": data[:offsets[3] + 512 + 3], "empty": b"",
            "random": bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8)),
            "one end block": data[:offsets[-1] + 1024] + bytes(512) + b"\x01" * 511,
            "gz cut": gz.getvalue()[:len(gz.getvalue()) // 2]}


@pytest.mark.parametrize("case", ["boundary", "mid-member", "empty", "random", "one end block", "gz cut"])
def test_truncated_or_broken_tars_are_one_error_naming_archive(tmp_path, case):
    data = _broken_tars()[case]
    archive = tmp_path / ("a.tar.gz" if case == "gz cut" else "a.tar")
    archive.write_bytes(data)
    with pytest.raises(BrokenArchiveError) as err:
        extract_archive(archive, tmp_path / "out", algos=("md5",))
    message = str(err.value)
    assert message.startswith("cannot read a.tar") and "\n" not in message
    if case == "boundary":
        # sorted(FILES): the two VOCdevkit members come first; the cut is before deep/a/b/c.PNG
        assert err.value.member == "VOCdevkit/VOC2007/JPEGImages/000001.jpg" and "end-of-archive" in message
    if case == "mid-member":
        assert err.value.member == "top.txt" and "unexpected end of data" in message


def test_zip_cut_short_is_one_error_naming_archive(tmp_path):
    archive = make_zip(tmp_path / "a.zip", sorted(FILES.items()))
    archive.write_bytes(archive.read_bytes()[:-30])
    with pytest.raises(BrokenArchiveError, match=r"^cannot read a.zip at its start: File is not a zip file"):
        extract_archive(archive, tmp_path / "out")
