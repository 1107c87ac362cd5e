"""Shards: what `build_shards` writes (read back with plain `tarfile`), bad input, and the read pipelines."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pytest
from PIL import Image as PILImage
from test_sources import jpeg_bytes, question_row, write_source
from torch.utils.data import DataLoader

from gqaru import shards as shards_module
from gqaru.cli import main as cli_main
from gqaru.shards import (
    ShardError,
    build_shards,
    inspect_shards,
    iter_eval_samples,
    list_question_ids,
    prepare_image,
    rank_plan,
    rank_sample_metas,
    read_manifest,
    training_pipeline,
)
from gqaru.sources import REJECTION_REASONS, instructions_config, select_question_ids


def read_with_tarfile(directory: Path) -> list[dict[str, Any]]:
    """Every sample of a shard dir, read with the standard library only (no webdataset)."""
    manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
    samples = []
    for shard in manifest["shards"]:
        with tarfile.open(directory / shard["file"]) as tar:
            members: dict[str, dict[str, bytes]] = {}
            order: list[str] = []
            for member in tar.getmembers():
                key, extension = member.name.split(".", 1)
                if key not in members:
                    members[key] = {}
                    order.append(key)
                file = tar.extractfile(member)
                assert file is not None
                members[key][extension] = file.read()
        for key in order:
            assert set(members[key]) == {"jpg", "json"}, f"{shard['file']}: {key} has {sorted(members[key])}"
            meta = json.loads(members[key]["json"])
            samples.append({"shard": shard["file"], "key": key, "jpg": members[key]["jpg"], "meta": meta})
    return samples


def source_questions(source: Path, split: str) -> dict[str, dict[str, Any]]:
    """The source's question rows by id (the first row of a duplicated id, as the build keeps)."""
    rows = datasets.load_dataset(str(source), instructions_config(split), split=split, streaming=True)
    first: dict[str, dict[str, Any]] = {}
    for row in rows:
        first.setdefault(row["id"], row)
    return first


def check_shard_dir(
    directory: Path, expected_question_ids: set[str], questions: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """The invariants every shard dir keeps, checked from the files alone."""
    manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
    samples = read_with_tarfile(directory)
    seen = Counter(qa["id"] for sample in samples for qa in sample["meta"]["qa"])
    assert set(seen) == expected_question_ids and set(seen.values()) == {1}, "every question exactly once"
    for sample in samples:
        meta = sample["meta"]
        assert sample["key"] == meta["imageId"]
        for qa in meta["qa"]:
            row = questions[qa["id"]]
            assert row["imageId"] == meta["imageId"], "a question sits in the sample of its own image"
            assert (qa["question"], qa["answer"], qa["fullAnswer"], qa["types"]) == (
                row["question"], row["answer"], row["fullAnswer"], row["types"],
            )
        with PILImage.open(io.BytesIO(sample["jpg"])) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert image.size == (meta["width"], meta["height"])
    assert len({sample["key"] for sample in samples}) == len(samples)
    counts = manifest["counts"]
    assert counts["images"] == len(samples) and counts["questions"] == sum(seen.values())
    assert counts["shards"] == len(manifest["shards"]) == len(list(directory.glob("*.tar")))
    for shard in manifest["shards"]:
        data = (directory / shard["file"]).read_bytes()
        assert (shard["bytes"], shard["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
        in_shard = [sample for sample in samples if sample["shard"] == shard["file"]]
        assert shard["images"] == len(in_shard)
        assert shard["questions_per_image"] == [len(sample["meta"]["qa"]) for sample in in_shard]
        assert shard["questions"] == sum(shard["questions_per_image"])
    lost = sum(entry.get("questions_lost", 0) for entry in manifest["rejected"].values())
    assert manifest["selection"]["selected"] == counts["questions"] + manifest["rejected"]["missing_image"]["count"] + lost
    assert not [path for path in directory.parent.iterdir() if ".partial-" in path.name or ".old-" in path.name]
    return samples


# --------------------------------------------------------------------------------------------
# Building from the synthetic source


@pytest.mark.parametrize("split", ["train", "testdev"])
def test_build_from_synthetic_source(synth_dir: Path, tmp_path: Path, split: str) -> None:
    out = tmp_path / split
    manifest = build_shards(str(synth_dir), split=split, out_dir=out, samples_per_shard=16, verbose=False)
    questions = source_questions(synth_dir, split)
    samples = check_shard_dir(out, set(questions), questions)
    assert manifest == read_manifest(out)
    assert manifest["counts"]["questions"] == len(questions) == {"train": 600, "testdev": 310}[split]
    assert manifest["counts"]["shards"] == -(-len(samples) // 16)
    assert all(entry["count"] == 0 for entry in manifest["rejected"].values())
    assert set(manifest["rejected"]) == set(REJECTION_REASONS)
    assert (manifest["source"], manifest["split"], manifest["image_size"]) == (str(synth_dir), split, None)
    assert manifest["created_with"].startswith("gqaru ")
    names = [f"{split}-{index:06d}.tar" for index in range(manifest["counts"]["shards"])]
    assert [shard["file"] for shard in manifest["shards"]] == names
    # JPEGs pass through untouched: the stored bytes are the source's bytes
    images = datasets.load_dataset(str(synth_dir), f"{split}_balanced_images", split=split, streaming=True)
    source_bytes = {row["id"]: row["image"]["bytes"] for row in images.cast_column("image", datasets.Image(decode=False))}
    assert all(sample["jpg"] == source_bytes[sample["key"]] for sample in samples)
    assert manifest["counts"]["reencoded_images"] == 0


def test_selected_build_holds_exactly_the_selection(synth_dir: Path, tmp_path: Path) -> None:
    manifest = build_shards(str(synth_dir), split="train", out_dir=tmp_path / "sel", max_samples=100, seed=5, verbose=False)
    questions = source_questions(synth_dir, "train")
    expected = set(select_question_ids(list(questions), 100, seed=5))
    check_shard_dir(tmp_path / "sel", expected, questions)
    assert manifest["selection"] | {"rule": None} == {
        "name": "seeded", "max_samples": 100, "seed": 5, "rule": None, "source_rows": 600, "available": 600,
        "selected": 100,
    }
    again = build_shards(str(synth_dir), split="train", out_dir=tmp_path / "again", max_samples=100, seed=5, verbose=False)
    assert [shard["sha256"] for shard in again["shards"]] == [shard["sha256"] for shard in manifest["shards"]]
    more = build_shards(str(synth_dir), split="train", out_dir=tmp_path / "more", max_samples=10_000, seed=5, verbose=False)
    assert more["counts"]["questions"] == more["selection"]["selected"] == 600


# --------------------------------------------------------------------------------------------
# Bad and unusual input


def image_bytes(image: PILImage.Image, format: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def unusual_images() -> dict[str, bytes]:
    rgba = PILImage.new("RGBA", (40, 30), (0, 0, 0, 0))
    rgba.paste((255, 0, 0, 255), (0, 0, 20, 30))  # left half opaque red, right half transparent black
    palette = PILImage.new("RGB", (30, 20), (0, 0, 255)).convert("P", palette=PILImage.Palette.ADAPTIVE)
    return {
        "png_rgba": image_bytes(rgba, "PNG"),
        "jpeg_grey": jpeg_bytes((33, 21), mode="L", color=(90, 90, 90)),
        "jpeg_cmyk": image_bytes(PILImage.new("CMYK", (24, 16), (0, 255, 255, 0)), "JPEG", quality=95),
        "png_palette": image_bytes(palette, "PNG"),
        "png_16bit": image_bytes(PILImage.new("I;16", (20, 10), 40000), "PNG"),
        "jpeg_large": jpeg_bytes((4000, 3000), color=(10, 120, 10)),
    }


def planted_source(root: Path) -> Path:
    good = jpeg_bytes((50, 40), color=(200, 200, 0))
    noise = np.random.default_rng(0).integers(0, 256, size=(120, 160, 3), dtype=np.uint8)
    noisy_jpeg = image_bytes(PILImage.fromarray(noise), "JPEG", quality=90)
    images: list[tuple[str, bytes | None]] = [("good", good)]
    images += list(unusual_images().items())
    images += [
        ("garbage", b"this is not an image"),
        ("truncated", noisy_jpeg[: len(noisy_jpeg) * 3 // 5]),  # cut mid-scan, as a broken download is
        ("good", jpeg_bytes((50, 40), color=(0, 0, 0))),  # duplicate row: the first is kept
        ("bad.id", jpeg_bytes()),
        ("unused", b"never looked at"),
    ]
    questions = [question_row(f"q-{image_id}-{index}", image_id) for image_id, _ in images[:7] for index in range(2)]
    questions += [
        question_row("q-garbage", "garbage"),
        question_row("q-truncated-0", "truncated"),
        question_row("q-truncated-1", "truncated"),
        question_row("q-dot", "bad.id"),
        question_row("q-ghost", "ghost"),
        question_row("q-empty-question", "good", question=" \t"),
        question_row("q-empty-answer", "good", answer=""),
        question_row("q-good-0", "png_rgba"),  # a duplicate question id: the first row wins
        question_row("", "good"),
    ]
    return write_source(root, {"testdev": (questions, images)})


def test_bad_input_is_counted_and_unusual_images_survive(tmp_path: Path) -> None:
    source = planted_source(tmp_path / "src")
    out = tmp_path / "shards"
    manifest = build_shards(str(source), split="testdev", out_dir=out, samples_per_shard=3, verbose=False)
    kept_images = ["good", *unusual_images()]
    expected = {f"q-{image_id}-{index}" for image_id in kept_images for index in range(2)}
    samples = check_shard_dir(out, expected, source_questions(source, "testdev"))
    assert [sample["key"] for sample in samples] == kept_images
    rejected = manifest["rejected"]
    counts = {name: entry["count"] for name, entry in rejected.items() if entry["count"]}
    assert counts == {
        "missing_question_id": 1,
        "duplicate_question_id": 1,
        "empty_question": 1,
        "empty_answer": 1,
        "missing_image": 1,
        "duplicate_image": 1,
        "invalid_image_id": 1,
        "undecodable_image": 2,
    }
    assert rejected["undecodable_image"]["examples"] == ["garbage", "truncated"]
    assert rejected["undecodable_image"]["questions_lost"] == 3
    assert rejected["invalid_image_id"] == {**rejected["invalid_image_id"], "examples": ["bad.id"], "questions_lost": 1}
    assert rejected["missing_image"]["examples"] == ["q-ghost"]
    assert manifest["counts"]["reencoded_images"] == 5  # all unusual ones but the large RGB JPEG

    by_key = {sample["key"]: sample for sample in samples}
    # passed through untouched, and from the first of the two "good" rows
    assert by_key["good"]["jpg"] == jpeg_bytes((50, 40), color=(200, 200, 0))

    def pixel(key: str, xy: tuple[int, int]) -> tuple[int, ...]:
        with PILImage.open(io.BytesIO(by_key[key]["jpg"])) as image:
            return image.getpixel(xy)

    def near(actual: tuple[int, ...], expected_rgb: tuple[int, int, int], tolerance: int = 12) -> bool:
        return all(abs(a - e) <= tolerance for a, e in zip(actual, expected_rgb, strict=True))

    assert (by_key["jpeg_large"]["meta"]["width"], by_key["jpeg_large"]["meta"]["height"]) == (4000, 3000)
    assert near(pixel("png_rgba", (5, 15)), (255, 0, 0)) and near(pixel("png_rgba", (35, 15)), (255, 255, 255))
    assert near(pixel("jpeg_cmyk", (12, 8)), (255, 0, 0), tolerance=20)
    assert near(pixel("jpeg_grey", (16, 10)), (90, 90, 90))
    assert near(pixel("png_palette", (15, 10)), (0, 0, 255))
    assert near(pixel("png_16bit", (10, 5)), (156, 156, 156))
    assert (by_key["png_16bit"]["meta"]["width"], by_key["png_16bit"]["meta"]["height"]) == (20, 10)


def test_oversized_image_is_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1_000_000)  # the 4000x3000 image is then a "bomb"
    source = planted_source(tmp_path / "src")
    manifest = build_shards(str(source), split="testdev", out_dir=tmp_path / "out", verbose=False)
    assert manifest["rejected"]["oversized_image"] | {"meaning": None} == {
        "count": 1, "unit": "image", "questions_lost": 2, "examples": ["jpeg_large"], "meaning": None,
    }


def with_claimed_size(jpeg: bytes, width: int, height: int) -> bytes:
    """The same JPEG with its frame header (SOF0) claiming another size: a decompression bomb's header."""
    frame = jpeg.index(b"\xff\xc0")
    return jpeg[: frame + 5] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + jpeg[frame + 9 :]


def with_marker_in_scan(jpeg: bytes) -> bytes:
    """The same JPEG with a stray DHT marker in the middle of its entropy-coded scan: every header is
    intact, so only a decoder that reads the scan can tell (libjpeg then fails on the bogus table)."""
    scan = jpeg.index(b"\xff\xda")
    middle = (scan + len(jpeg)) // 2
    return jpeg[:middle] + b"\xff\xc4" + jpeg[middle:]


def noisy_jpeg() -> bytes:
    noise = np.random.default_rng(1).integers(0, 256, size=(96, 128, 3), dtype=np.uint8)
    return image_bytes(PILImage.fromarray(noise), "JPEG", quality=90)


def test_the_check_rejects_what_does_not_decode_in_full() -> None:
    """The cheap check still decodes every image: a header that parses is not enough."""
    good = noisy_jpeg()
    assert prepare_image(good).jpeg == good
    bad = {
        "truncated_mid_scan": good[: len(good) * 2 // 3],
        "garbage": b"\x89PNG but not really" * 10,
        "corrupt_scan": with_marker_in_scan(good),
        "no_bytes": b"",
    }
    with PILImage.open(io.BytesIO(bad["corrupt_scan"])) as opened:
        assert (opened.format, opened.size) == ("JPEG", (128, 96)), "its headers alone look fine"
    for name, data in bad.items():
        with pytest.raises(shards_module.ImageRejected) as rejected:
            prepare_image(data)
        assert rejected.value.reason == "undecodable_image", name
    bomb = with_claimed_size(jpeg_bytes((16, 16)), 30_000, 30_000)  # 900 M pixels, over twice PIL's limit
    with pytest.raises(shards_module.ImageRejected) as rejected:
        prepare_image(bomb)
    assert rejected.value.reason == "oversized_image" and "pixels" in rejected.value.detail
    copy = pickle.loads(pickle.dumps(rejected.value))  # how a check worker sends it back
    assert (type(copy), copy.reason, copy.detail) == (shards_module.ImageRejected, "oversized_image", rejected.value.detail)


def test_tar_headers_are_tarfiles_own_bytes() -> None:
    """The fast header is tarfile's (`TarInfo.tobuf`) byte for byte, across names and sizes; what its
    template does not cover goes to tarfile itself, errors included."""
    names = ["a.jpg", "2354786.json", "n" * 64 + ".json", "x_y-Z.jpg", "q" * 100, "ключ.json"]
    sizes = [0, 1, 511, 512, 513, 11_000, 8**11 - 1]
    for name in names:
        for size in sizes:
            assert shards_module._tar_header(name, size) == shards_module._tarfile_header(name, size), (name, size)
    long_name = "d/" * 60 + "a.jpg"  # over 100 bytes: tarfile splits it into prefix and name
    assert shards_module._tar_header(long_name, 5) == shards_module._tarfile_header(long_name, 5)
    with pytest.raises(ValueError, match="overflow"):  # over USTAR's 8 GiB, as tarfile says
        shards_module._tar_header("a.jpg", 8**11)
    member = shards_module._tar_member("k.json", b"{}")
    with tarfile.open(fileobj=io.BytesIO(member + bytes(1024))) as tar:
        (info,) = tar.getmembers()
        assert (info.name, info.size, info.mode, info.mtime, info.uname, info.chksum) == (
            "k.json", 2, 0o444, 0, "gqaru", tarfile.calc_chksums(member[:512])[0],
        )


def bad_images_source(root: Path, good_images: int) -> Path:
    """`good_images` images, with a truncated, a garbage, a corrupt-scan and an oversized one among them."""
    images = [(f"im{index:03d}", jpeg_bytes((24, 16), color=(index % 256, 40, 90))) for index in range(good_images)]
    bad = {
        "truncated": noisy_jpeg()[:700],
        "garbage": b"not an image at all",
        "corruptscan": with_marker_in_scan(noisy_jpeg()),
        "bomb": with_claimed_size(jpeg_bytes((16, 16)), 30_000, 30_000),
    }
    for position, item in zip((3, 17, 18, 40), bad.items(), strict=True):
        images.insert(min(position, len(images)), item)
    questions = [question_row(f"q-{image_id}-{k}", image_id) for index, (image_id, _) in enumerate(images)
                 for k in range(1 + index % 3)]
    return write_source(root, {"train": (questions, images)})


@pytest.mark.parametrize("image_size", [None, 12])
def test_any_worker_count_writes_the_same_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, image_size: int | None
) -> None:
    """1, 2 and 3 workers: the same shard files and manifest, byte for byte, the same rejections.

    Small batches, so many are in flight and workers finish out of order; with `image_size`
    every image is re-encoded in the workers and its new bytes come back.
    """
    monkeypatch.setattr(shards_module, "CHECK_BATCH_IMAGES", 3)
    source = bad_images_source(tmp_path / "src", good_images=60)
    built = {}
    for workers in (1, 2, 3):
        out = tmp_path / f"w{workers}"
        manifest = build_shards(str(source), split="train", out_dir=out, samples_per_shard=7, image_size=image_size,
                                workers=workers, verbose=False)
        built[workers] = {path.name: path.read_bytes() for path in sorted(out.iterdir())}
        assert len(built[workers]) == manifest["counts"]["shards"] + 1 > 8
    assert built[1] == built[2] == built[3]
    manifest = json.loads(built[1]["manifest.json"])
    rejected = {name: (entry["count"], entry["examples"]) for name, entry in manifest["rejected"].items() if entry["count"]}
    assert rejected == {
        "undecodable_image": (3, ["truncated", "garbage", "corruptscan"]),
        "oversized_image": (1, ["bomb"]),
    }
    assert manifest["counts"]["images"] == 60
    assert manifest["counts"]["reencoded_images"] == (60 if image_size else 0)
    kept = {f"q-im{index:03d}-" for index in range(60)}
    expected = {question_id for question_id in source_questions(source, "train") if question_id[:8] in kept}
    samples = check_shard_dir(tmp_path / "w2", expected, source_questions(source, "train"))
    assert [sample["key"] for sample in samples] == [f"im{index:03d}" for index in range(60)]  # source order


def test_a_failing_worker_fails_the_build_and_leaves_no_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import multiprocessing

    monkeypatch.setattr(shards_module, "CHECK_BATCH_IMAGES", 2)
    source = bad_images_source(tmp_path / "src", good_images=30)

    def failing_prepare(data: bytes | None, image_size: int | None = None) -> Any:
        if data and b"\x00\x11\x08\x00\x10\x00\x18" in data[:200]:  # the 24x16 images' frame header
            raise RuntimeError("worker on fire")
        return prepare_image(data, image_size)

    monkeypatch.setattr(shards_module, "prepare_image", failing_prepare)  # forked workers inherit it
    with pytest.raises(RuntimeError, match="worker on fire"):
        build_shards(str(source), split="train", out_dir=tmp_path / "out", workers=2, verbose=False)
    assert multiprocessing.active_children() == []
    assert sorted(path.name for path in tmp_path.iterdir()) == ["src"]
    with pytest.raises(ValueError, match="workers must be a positive"):
        build_shards(str(source), split="train", out_dir=tmp_path / "out", workers=0, verbose=False)


def test_a_source_with_nothing_valid_gives_an_empty_shard_dir(tmp_path: Path) -> None:
    questions = [question_row("q1", "a", answer=" "), question_row("q2", "a", question="")]
    source = write_source(tmp_path / "src", {"testdev": (questions, [("a", jpeg_bytes())])})
    manifest = build_shards(str(source), split="testdev", out_dir=tmp_path / "out", verbose=False)
    assert manifest["counts"] | {"bytes": 0} == {"images": 0, "questions": 0, "shards": 0, "bytes": 0, "reencoded_images": 0}
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["manifest.json"]
    assert inspect_shards(tmp_path / "out") and list_question_ids(tmp_path / "out") == []
    with pytest.raises(ShardError, match="no shards"):
        training_pipeline(tmp_path / "out")


def test_image_size_downscales_only(tmp_path: Path) -> None:
    big = jpeg_bytes((400, 300))
    prepared = prepare_image(big, image_size=150)
    assert (prepared.width, prepared.height, prepared.reencoded) == (200, 150, True)
    with PILImage.open(io.BytesIO(prepared.jpeg)) as image:
        assert image.size == (200, 150) and image.format == "JPEG"
    portrait = prepare_image(jpeg_bytes((300, 451)), image_size=100)
    assert (portrait.width, portrait.height) == (100, 150)
    small = prepare_image(big, image_size=300)  # shorter side already 300: untouched
    assert (small.jpeg, small.reencoded) == (big, False)
    png = prepare_image(image_bytes(PILImage.new("RGB", (64, 32), (5, 5, 5)), "PNG"), image_size=16)
    assert (png.width, png.height) == (32, 16)
    source = write_source(tmp_path / "src", {"testdev": ([question_row("q1", "a")], [("a", big)])})
    manifest = build_shards(str(source), split="testdev", out_dir=tmp_path / "out", image_size=150, verbose=False)
    assert manifest["image_size"] == 150
    assert [(s["meta"]["width"], s["meta"]["height"]) for s in read_with_tarfile(tmp_path / "out")] == [(200, 150)]


# --------------------------------------------------------------------------------------------
# Rebuilds


def test_rerun_replaces_the_dir_whole(synth_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    first = build_shards(str(synth_dir), split="testdev", out_dir=out, samples_per_shard=2, verbose=False)
    (out / "stray.txt").write_text("left from before")
    second = build_shards(str(synth_dir), split="testdev", out_dir=out, samples_per_shard=100, verbose=False)
    assert first["counts"]["shards"] > 1 and second["counts"]["shards"] == 1
    assert sorted(path.name for path in out.iterdir()) == ["manifest.json", "testdev-000000.tar"]
    assert inspect_shards(out)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["shards"]  # no staging or retired dirs left


def test_refuses_to_replace_a_dir_that_is_not_a_shard_dir(synth_dir: Path, tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(ShardError, match="not a shard dir"):
        build_shards(str(synth_dir), split="testdev", out_dir=precious, verbose=False)
    assert (precious / "thesis.tex").read_text() == "years of work"


def test_a_failed_build_leaves_the_previous_dir_intact(
    synth_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "shards"
    before = build_shards(str(synth_dir), split="testdev", out_dir=out, verbose=False)
    calls = []

    def failing_prepare(data: bytes | None, image_size: int | None = None) -> Any:
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("disk on fire")
        return prepare_image(data, image_size)

    monkeypatch.setattr(shards_module, "prepare_image", failing_prepare)
    with pytest.raises(RuntimeError, match="disk on fire"):
        build_shards(str(synth_dir), split="testdev", out_dir=out, samples_per_shard=1, verbose=False)
    assert read_manifest(out) == before and inspect_shards(out)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["shards"]


# --------------------------------------------------------------------------------------------
# CLI


def test_cli_build_and_inspect_detects_corruption(
    synth_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli"
    code = cli_main(["shards", "build", "--source", str(synth_dir), "--split", "testdev", "--out", str(out),
                     "--max-samples", "50", "--seed", "1", "--samples-per-shard", "3", "--workers", "2"])
    assert code == 0
    manifest = read_manifest(out)
    assert manifest["counts"]["questions"] == 50 and manifest["counts"]["shards"] >= 2
    summary = capsys.readouterr().out
    assert "50 questions" in summary and "skipped: none" in summary

    assert cli_main(["shards", "inspect", str(out)]) == 0
    assert "verified" in capsys.readouterr().out

    victim = out / manifest["shards"][1]["file"]
    data = bytearray(victim.read_bytes())
    data[700] ^= 0xFF  # same size, different content
    victim.write_bytes(bytes(data))
    assert cli_main(["shards", "inspect", str(out)]) == 1
    printed = capsys.readouterr().out
    assert f"FAILED {victim.name}: sha256" in printed
    assert cli_main(["shards", "inspect", "--no-verify", str(out)]) == 0

    (out / manifest["shards"][0]["file"]).unlink()
    assert cli_main(["shards", "inspect", str(out)]) == 1
    assert f"{manifest['shards'][0]['file']}: missing" in capsys.readouterr().out
    assert cli_main(["shards", "inspect", str(tmp_path)]) == 1


# --------------------------------------------------------------------------------------------
# Read pipelines


@pytest.fixture(scope="module")
def plan_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """23 tiny images with 1-4 questions each, so plans are easy to tell apart."""
    root = tmp_path_factory.mktemp("plan")
    images = [(f"im{index:02d}", jpeg_bytes((8, 8), color=(index * 10, 0, 0))) for index in range(23)]
    questions = [question_row(f"q{index:02d}-{k}", f"im{index:02d}") for index in range(23) for k in range(1 + index % 4)]
    return write_source(root / "src", {"train": (questions, images)})


@pytest.fixture(scope="module")
def plan_shards(plan_source: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """The same 23 images as 23, 12, 3 and 1 shard(s)."""
    root = tmp_path_factory.mktemp("plan-shards")
    built = {}
    for per_shard in (1, 2, 10, 50):
        out = root / f"per{per_shard}"
        manifest = build_shards(str(plan_source), split="train", out_dir=out, samples_per_shard=per_shard, verbose=False)
        built[manifest["counts"]["shards"]] = out
    assert sorted(built) == [1, 3, 12, 23]
    return built


def read_rank(directory: Path, rank: int, world_size: int, num_workers: int, **options: Any) -> list[dict[str, Any]]:
    pipeline = training_pipeline(directory, rank=rank, world_size=world_size, num_workers=num_workers, **options)
    if num_workers == 0:
        return list(pipeline)
    return list(DataLoader(pipeline, batch_size=None, num_workers=num_workers))


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("num_shards", [23, 12, 3, 1])
def test_rank_plan_matches_the_pipeline(plan_shards: dict[int, Path], num_shards: int, num_workers: int) -> None:
    directory = plan_shards[num_shards]
    for world_size in (1, 2, 3):
        seen: Counter[str] = Counter()
        for rank in range(world_size):
            samples = read_rank(directory, rank, world_size, num_workers, seed=7, epoch=1, shuffle_buffer=4)
            assert sorted(len(sample["meta"]["qa"]) for sample in samples) == sorted(
                rank_plan(directory, rank, world_size, num_workers)
            ), f"rank {rank} of {world_size}, {num_workers} workers, {num_shards} shards"
            metas = list(rank_sample_metas(directory, rank, world_size, num_workers))
            assert sorted(meta["imageId"] for meta in metas) == sorted(sample["key"] for sample in samples)
            for sample in samples:
                assert sample["key"] == sample["meta"]["imageId"]
                assert isinstance(sample["image"], PILImage.Image) and sample["image"].mode == "RGB"
                assert sample["image"].size == (8, 8)
            seen.update(sample["key"] for sample in samples)
        assert sorted(seen) == [f"im{index:02d}" for index in range(23)] and set(seen.values()) == {1}


def test_training_order_is_seeded_and_the_set_is_fixed(plan_shards: dict[int, Path]) -> None:
    directory = plan_shards[12]

    def keys(**options: Any) -> list[str]:
        return [sample["key"] for sample in read_rank(directory, 1, 2, 0, **options)]

    epoch0 = keys(seed=3, epoch=0)
    assert keys(seed=3, epoch=0) == epoch0
    assert keys(seed=3, epoch=1) != epoch0 and sorted(keys(seed=3, epoch=1)) == sorted(epoch0)
    assert keys(seed=4, epoch=0) != epoch0
    unshuffled = keys(seed=3, epoch=0, shuffle_buffer=0)
    assert sorted(unshuffled) == sorted(epoch0)


def test_pipeline_checks_its_worker_count(plan_shards: dict[int, Path]) -> None:
    pipeline = training_pipeline(plan_shards[12], num_workers=2)
    pickle.loads(pickle.dumps(pipeline))  # spawn-started DataLoader workers (macOS, Windows) pickle it
    with pytest.raises(ShardError, match="num_workers=2 but is read by 0"):
        list(pipeline)
    with pytest.raises(ValueError, match="rank"):
        rank_plan(plan_shards[12], 2, 2)


def test_eval_reader_is_ordered_filtered_and_split(plan_shards: dict[int, Path]) -> None:
    directory = plan_shards[3]
    every = list(iter_eval_samples(directory))
    assert [sample["key"] for sample in every] == [f"im{index:02d}" for index in range(23)]
    all_ids = list_question_ids(directory)
    assert all_ids == sorted(qa["id"] for sample in every for qa in sample["meta"]["qa"])
    assert len(all_ids) == sum(1 + index % 4 for index in range(23))
    wanted = set(select_question_ids(all_ids, 9, seed=42))
    parts = [list(iter_eval_samples(directory, question_ids=wanted, rank=rank, world_size=2)) for rank in range(2)]
    got = [qa["id"] for part in parts for sample in part for qa in sample["meta"]["qa"]]
    assert sorted(got) == sorted(wanted)
    kept_keys = [sample["key"] for sample in every if any(qa["id"] in wanted for qa in sample["meta"]["qa"])]
    assert [sample["key"] for sample in parts[0]] == kept_keys[0::2]
    assert [sample["key"] for sample in parts[1]] == kept_keys[1::2]
    assert all(sample["image"].mode == "RGB" for part in parts for sample in part)
