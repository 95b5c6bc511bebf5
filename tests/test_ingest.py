"""Ingest through a real Ray Data job on real image files, including every kind of bad input."""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import numpy as np
import pytest
from PIL import Image

from pipeline.config import Config, IngestConfig, PathsConfig
from pipeline.data.schema import BadImage, decode_rgb
from pipeline.data.shards import load_manifest, load_stats, read_shards
from pipeline.ingest import run_ingest


def _decompression_bomb(path) -> None:
    """A tiny PNG whose header declares > 2x Pillow's MAX_IMAGE_PIXELS: Pillow must refuse it."""
    Image.new("1", (20_000, 10_000)).save(path)
    assert 20_000 * 10_000 > 2 * Image.MAX_IMAGE_PIXELS
    assert path.stat().st_size < 1_000_000


@pytest.fixture(scope="module")
def messy_folder(tmp_path_factory, photo_files, digits_folder):
    """Class folders holding good JPEG/PNG photos and digits plus one of each bad input."""
    root = tmp_path_factory.mktemp("messy")
    (root / "photos").mkdir()
    (root / "digits").mkdir()
    for p in photo_files[:6]:
        shutil.copy(p, root / "photos" / p.name)
    Image.open(photo_files[0]).save(root / "photos" / "as_png.png")
    for p in sorted((digits_folder / "7").iterdir())[:5]:
        shutil.copy(p, root / "digits" / p.name)
    good = 6 + 1 + 5
    jpeg = photo_files[1].read_bytes()
    (root / "photos" / "zero.jpg").write_bytes(b"")
    (root / "photos" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "photos" / "text.jpg").write_text("<html>not an image</html>")
    (root / "photos" / "noise.png").write_bytes(np.random.default_rng(0).bytes(4096))
    Image.new("RGB", (4, 4)).save(root / "digits" / "tiny.png")
    _decompression_bomb(root / "digits" / "bomb.png")
    (root / "photos" / ".DS_Store").write_bytes(b"hidden: ignored, not an input")
    (root / "README.txt").write_text("a stray file outside any class folder: an unlabelled input")
    (root / "digits" / "dangling.png").symlink_to(root / "gone.png")
    expected = {"ok": good, "missing": 1, "empty": 1, "truncated": 1, "not_image": 3, "too_small": 1, "too_large": 1}
    return root, expected


def ingest(input_path, out, source="image_folder", **kw) -> dict:
    cfg = Config(
        paths=PathsConfig(root=str(out.parent / "root")),
        ingest=IngestConfig(source=source, input=str(input_path), output=str(out), min_side=8, **kw),
    )
    return run_ingest(cfg)


def test_bad_inputs_are_skipped_and_counted_by_reason(ray_cluster, messy_folder, tmp_path):
    root, expected = messy_folder
    stats = ingest(root, tmp_path / "shards", samples_per_shard=5, max_side=256)
    assert stats["counts"] == expected
    assert stats["total"] == sum(expected.values())
    manifest = load_manifest(str(tmp_path / "shards"))
    assert len(manifest) == stats["total"], "one manifest row per input, kept or skipped"
    assert manifest["key"].is_unique
    by_name = {p.split("/")[-1]: row for p, row in zip(manifest["input"], manifest.to_dict("records"))}
    assert by_name["truncated.jpg"]["status"] == "truncated"
    assert by_name["bomb.png"]["status"] == "too_large"
    assert by_name["README.txt"]["status"] == "not_image" and by_name["dangling.png"]["status"] == "missing"
    assert stats["labels"] == ["digits", "photos"]
    assert by_name["zero.jpg"]["shard"] == "" and by_name["zero.jpg"]["detail"] == ""
    assert (manifest["status"] == "ok").sum() == (manifest["shard"] != "").sum()
    assert load_stats(str(tmp_path / "shards")) == {k: v for k, v in stats.items() if k not in ("output", "run_id")}


def test_kept_samples_read_back_with_schema(ray_cluster, messy_folder, photo_files, tmp_path):
    root, expected = messy_folder
    ingest(root, tmp_path / "shards", samples_per_shard=4, max_side=256)
    rows = read_shards(str(tmp_path / "shards")).take_all()
    assert len(rows) == expected["ok"]
    manifest = load_manifest(str(tmp_path / "shards")).set_index("key")
    labels = {}
    for row in rows:
        meta = json.loads(row["json"])
        image = decode_rgb(row["jpg"])
        assert (meta["height"], meta["width"]) == image.shape[:2]
        assert max(image.shape[:2]) <= 256
        assert meta["source"] == "image_folder"
        assert meta["labels"] == [meta["id"].split("/")[0]], "label = class folder"
        entry = manifest.loc[row["__key__"]]
        assert entry["status"] == "ok" and row["__url__"].endswith("/" + entry["shard"])
        labels[meta["id"]] = meta["labels"]
    assert labels["photos/as_png"] == ["photos"] and sum(v == ["digits"] for v in labels.values()) == 5
    # the listing is sorted by class (7 photos, then 5 digits); the seeded shuffle mixes the shards
    shard_classes = {}
    for row in rows:
        shard_classes.setdefault(row["__url__"], set()).add(json.loads(row["json"])["labels"][0])
    assert any(len(classes) == 2 for classes in shard_classes.values()), shard_classes


def test_listing_is_shuffled_with_its_seed_before_sharding():
    from pipeline.ingest import shuffled

    items = [{"id": f"{c}/{i}", "labels": [c]} for c in "abcd" for i in range(25)]  # sorted by class
    ing = IngestConfig()
    once, again = shuffled(items, ing), shuffled(items, ing)
    assert once == again and once != items
    assert sorted(x["id"] for x in once) == sorted(x["id"] for x in items), "a permutation: nothing lost"
    assert shuffled(items, IngestConfig(shuffle_seed=1)) != once
    assert shuffled(items, IngestConfig(shuffle=False)) == items

    def classes_per_shard(listing, n=10):
        return [len({x["labels"][0] for x in listing[i : i + n]}) for i in range(0, len(listing), n)]

    assert max(classes_per_shard(items)) <= 2  # in listing order a shard of 10 holds one or two classes
    assert min(classes_per_shard(once)) >= 3  # shuffled, every shard holds most of the four


def test_small_jpeg_keeps_its_original_bytes(ray_cluster, photo_files, tmp_path):
    small = tmp_path / "in" / "a"
    small.mkdir(parents=True)
    Image.open(photo_files[0]).resize((100, 80)).save(small / "x.jpg", quality=77)
    big = Image.open(photo_files[0])
    big.save(small / "big.jpg")
    ingest(tmp_path / "in", tmp_path / "shards", max_side=120)
    rows = {json.loads(r["json"])["id"]: r for r in read_shards(str(tmp_path / "shards")).take_all()}
    assert rows["a/x"]["jpg"] == (small / "x.jpg").read_bytes(), "re-encoded at most once: untouched"
    assert max(Image.open(io.BytesIO(rows["a/big"]["jpg"])).size) == 120


def test_shards_read_as_one_block_per_tar(ray_cluster, photo_files, tmp_path):
    """Ray Data would split each file's block into odd pieces (a short crop batch per piece)."""
    for i, path in enumerate(photo_files[:9]):
        (tmp_path / "in" / "c").mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / "c" / f"{i}.jpg").write_bytes(path.read_bytes())
    stats = ingest(tmp_path / "in", tmp_path / "shards", samples_per_shard=3)
    assert len(stats["shards"]) == 3
    bundles = list(read_shards(str(tmp_path / "shards")).iter_internal_ref_bundles())
    assert sorted(b.num_rows() for b in bundles) == [3, 3, 3]


def test_file_list_counts_missing_paths(ray_cluster, photo_files, tmp_path):
    listing = tmp_path / "paths.txt"
    listing.write_text(
        "# a comment\n"
        + "\n".join(str(p) for p in photo_files[:3])
        + f"\n\n{tmp_path}/nope.jpg\nrelative_missing.png\n"
    )
    stats = ingest(listing, tmp_path / "shards", source="files")
    assert stats["counts"] == {"ok": 3, "missing": 2}
    manifest = load_manifest(str(tmp_path / "shards"))
    assert (
        manifest.loc[manifest["status"] == "missing", "input"].str.endswith(("nope.jpg", "relative_missing.png")).all()
    )


def test_rerun_replaces_the_shard_set(ray_cluster, messy_folder, tmp_path):
    root, expected = messy_folder
    out = tmp_path / "shards"
    first = ingest(root, out, samples_per_shard=3)
    second = ingest(root, out, samples_per_shard=6)
    assert first["counts"] == second["counts"] == expected
    tars = sorted(p.name for p in out.glob("shard-*.tar"))
    assert tars == second["shards"], "no stale shards from the first run"
    members = []
    for t in tars:
        with tarfile.open(out / t) as tar:
            members += [m for m in tar.getnames() if m.endswith(".jpg")]
    assert len(members) == expected["ok"], "no duplicates"


def test_unexpected_errors_are_counted_not_raised(monkeypatch, photo_files, tmp_path):
    """The shard task body on its own: an exception nobody foresaw becomes a `corrupt` row."""
    import dataclasses

    from pipeline.data import shards

    real = shards.encode_sample

    def flaky(data, cfg):
        if data == photo_files[1].read_bytes():
            raise RuntimeError("boom")
        return real(data, cfg)

    monkeypatch.setattr(shards, "encode_sample", flaky)
    items = [{"key": f"{i:09d}", "input": str(p), "id": p.stem} for i, p in enumerate(photo_files[:3])]
    row = {"shard_index": 0, "items_json": json.dumps(items)}
    manifest = shards._write_one_shard(row, str(tmp_path), "files", dataclasses.asdict(IngestConfig()))
    assert [m["status"] for m in manifest] == ["ok", "corrupt", "ok"]
    assert manifest[1]["detail"] == "RuntimeError: boom" and manifest[1]["shard"] == ""
    with tarfile.open(tmp_path / "shard-000000.tar") as tar:
        assert sorted(tar.getnames()) == ["000000000.jpg", "000000000.json", "000000002.jpg", "000000002.json"]


def test_decode_reasons_directly(photo_files, tmp_path):
    """The schema's reason mapping on its own, without Ray: each bad kind maps to one reason."""
    jpeg = photo_files[0].read_bytes()
    cases = {b"": "empty", b"GIF89a-but-not-really": "not_image", jpeg[: len(jpeg) // 3]: "truncated"}
    for data, reason in cases.items():
        with pytest.raises(BadImage) as exc:
            decode_rgb(data)
        assert exc.value.reason == reason
    assert decode_rgb(jpeg).dtype == np.uint8
