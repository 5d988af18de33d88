import json
import os
import re
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from patchnet.data import load_image, open_split
from patchnet.features.build import cache_fields, cache_spec
from patchnet.features.extract import build_extractor
from patchnet.store import CacheError, key
from patchnet.store.codec import CodecError, FeatureCodec

from conftest import build, tiny_recipe


class CountingExtractor:
    """Wraps an extractor; counts calls and can fail after a number of them (a simulated kill)."""

    def __init__(self, inner, fail_after=None):
        self.inner, self.calls, self.fail_after = inner, 0, fail_after

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def extract(self, image):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt
        self.calls += 1
        return self.inner.extract(image)

    def __call__(self, image):
        return self.extract(image)[0]


def _setup(tmp_path, small_voc, *overrides):
    recipe = tiny_recipe(tmp_path, small_voc, *overrides)
    return recipe, open_split(recipe.data, "train"), build_extractor(recipe)


def test_features_are_computed_once_then_read_from_disk(tmp_path, small_voc):
    recipe, ds, ex = _setup(tmp_path, small_voc)
    counting = CountingExtractor(ex)
    store = build(recipe, ds, counting, progress=False)
    assert counting.calls == len(ds)
    assert store.rows.stored.dtype == np.float16 and isinstance(store.rows.stored, np.memmap)
    assert store.rows.shape == (store.num_patches, ex.feature_dim) and store.feature_dim == ex.feature_dim
    # the stored rows are the extractor's features of each image, in grid order
    from patchnet.data import load_image

    direct = ex(load_image(ds.records[1].path)).numpy()
    np.testing.assert_allclose(store.rows[store.item_slice(1)], direct, rtol=2e-3, atol=1e-3)
    np.testing.assert_array_equal(
        store.patch_boxes[store.item_slice(1)], ex.boxes(ds.records[1].width, ds.records[1].height)
    )
    again = CountingExtractor(ex)
    store2 = build(recipe, ds, again, progress=False)
    assert again.calls == 0 and store2.path == store.path


def _shard_worker(rank, world, port, tmp_path, root):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    recipe, ds, ex = _setup(tmp_path, root, "cache.chunk=1")
    seen = []

    class Recording(CountingExtractor):
        def extract(self, image):
            seen.append(list(image.shape[-2:]))
            return super().extract(image)

    build(recipe, ds, Recording(ex), progress=False)
    (tmp_path / f"seen{rank}.json").write_text(json.dumps(seen))
    torch.distributed.destroy_process_group()


@pytest.mark.slow  # a subprocess or several processes
def test_extraction_under_torchrun_splits_the_images_across_ranks(tmp_path, small_voc):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_shard_worker, args=(2, port, tmp_path, small_voc), nprocs=2, join=True)
    seen = [{tuple(hw) for hw in json.loads((tmp_path / f"seen{r}.json").read_text())} for r in range(2)]
    recipe, ds, ex = _setup(tmp_path, small_voc, "cache.chunk=1")
    sizes = {(r.height, r.width) for r in ds.records}
    assert len(sizes) == len(ds) == 4  # the fixture's training images all differ in size
    assert seen[0] and seen[1] and not seen[0] & seen[1] and seen[0] | seen[1] == sizes
    # the joined cache holds every image, in dataset order, as one process would have written it
    joined = build(recipe, ds, CountingExtractor(ex, fail_after=0), progress=False)
    single = build(tiny_recipe(tmp_path / "one", small_voc, "cache.chunk=1"), ds, ex, progress=False)
    np.testing.assert_array_equal(joined.offsets, single.offsets)
    np.testing.assert_allclose(joined.rows[:], single.rows[:], rtol=2e-3, atol=1e-3)


@pytest.mark.parametrize(
    "override",
    [
        "patches.scales=[1.0, 3.0]",
        "patches.step=0.4",
        "patches.mode=exact",
        "backbone.input_size=48",
        "backbone.precision=bf16",
        "patches.levels=[1.0]",
        "patches.exact_up_to=1.0",
        "backbone.weights=random",
    ],
)
def test_any_input_of_the_features_changes_the_key(tmp_path, small_voc, override):
    _recipe, ds, ex = _setup(tmp_path, small_voc)
    base = key(cache_fields(ds, ex))
    _recipe2, ds2, ex2 = _setup(tmp_path, small_voc, override)
    assert key(cache_fields(ds2, ex2)) != base


def test_key_changes_with_the_image_list_and_views_but_not_with_training_settings(tmp_path, small_voc):
    recipe, ds, ex = _setup(tmp_path, small_voc)
    base = key(cache_fields(ds, ex))
    assert key(cache_fields(open_split(recipe.data, "val"), ex)) != base
    smaller = type(ds)(ds.name, ds.classes, ds.records[:-1])
    assert key(cache_fields(smaller, ex)) != base
    assert key(cache_fields(ds, ex, 2, cache_spec(recipe, ex))) != base
    recipe2, _, _ = _setup(tmp_path, small_voc, "train.lr=0.5", "train.epochs=9", "infer.k=2")
    assert key(cache_fields(ds, ex, 0, cache_spec(recipe2, ex))) == base


def test_a_killed_build_resumes_where_it_stopped(tmp_path, small_voc):
    recipe, ds, ex = _setup(tmp_path, small_voc)  # chunks of 2 images
    with pytest.raises(KeyboardInterrupt):
        build(recipe, ds, CountingExtractor(ex, fail_after=3), progress=False)
    # one whole chunk (2 images) was saved; the third image's chunk was not complete
    resumed = CountingExtractor(ex)
    store = build(recipe, ds, resumed, progress=False)
    assert resumed.calls == len(ds) - 2
    clean_recipe, _, _ = _setup(tmp_path / "clean", small_voc)
    clean = build(clean_recipe, ds, ex, progress=False)
    np.testing.assert_array_equal(store.offsets, clean.offsets)
    np.testing.assert_allclose(store.rows[:], clean.rows[:], atol=1e-3)


def test_a_build_resumed_with_another_chunk_size_gives_the_rows_of_a_fresh_build(tmp_path, small_voc, monkeypatch):
    """Chunks of 3 images (0-2, then 3) left by a build killed before its join; resumed with chunks of 1, the file of
    chunk 1 (image 3) must not be taken for image 1's."""
    recipe, ds, ex = _setup(tmp_path, small_voc, "cache.chunk=3")

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr("patchnet.features.build.join_chunks", killed)
    with pytest.raises(KeyboardInterrupt):
        build(recipe, ds, ex, progress=False)
    monkeypatch.undo()
    chunks = sorted(p.name for p in (tmp_path / "cache").glob("*/chunks/*.npz"))
    assert chunks == ["000000.npz", "000001.npz"]
    resumed_recipe, _, _ = _setup(tmp_path, small_voc, "cache.chunk=1")
    resumed = CountingExtractor(ex)
    store = build(resumed_recipe, ds, resumed, progress=False)
    assert resumed.calls == len(ds)  # no chunk of the killed build holds a chunk of 1 image: all computed again
    clean_recipe, _, _ = _setup(tmp_path / "clean", small_voc)
    clean = build(clean_recipe, ds, ex, progress=False)
    np.testing.assert_array_equal(store.offsets, clean.offsets)
    np.testing.assert_array_equal(store.patch_boxes, clean.patch_boxes)
    np.testing.assert_allclose(store.rows[:], clean.rows[:], atol=1e-3)
    # resumed with its own chunk size, a killed build's chunks are taken as they are
    monkeypatch.setattr("patchnet.features.build.join_chunks", killed)
    again_recipe, _, _ = _setup(tmp_path / "again", small_voc, "cache.chunk=3")
    with pytest.raises(KeyboardInterrupt):
        build(again_recipe, ds, ex, progress=False)
    monkeypatch.undo()
    again = CountingExtractor(ex)
    np.testing.assert_allclose(build(again_recipe, ds, again, progress=False).rows[:], clean.rows[:], atol=1e-3)
    assert again.calls == 0


def test_two_input_sizes_give_two_int8_calibrations(tmp_path, small_voc):
    from patchnet.features.build import calibrate_extractor

    ranges = []
    for size in (32, 64):
        recipe, ds, ex = _setup(
            tmp_path, small_voc, "backbone.precision=int8", "backbone.int8_images=1", f"backbone.input_size={size}"
        )
        calibrate_extractor(recipe, ex, ds, progress=False)
        ranges.append(ex.int8_ranges)
    assert len(list((tmp_path / "cache" / "int8").glob("*.json"))) == 2
    assert ranges[0] != ranges[1]  # the activations' ranges change with the input size


def test_a_corrupt_image_is_skipped_and_counted(tmp_path, small_voc, caplog):
    (small_voc / "JPEGImages" / "b.jpg").write_bytes(b"\xff\xd8\xff garbage")
    recipe, ds, ex = _setup(tmp_path, small_voc)
    assert len(ds) == 4 and "b.jpg" in ds.fixes["unreadable"][0]
    store = build(recipe, ds, ex, progress=False)
    assert store.ok.tolist() == [True, False, True, True]
    assert store.item_slice(1).stop == store.item_slice(1).start
    assert len(store.failures) == 1 and "b.jpg" in store.failures[0]
    assert "unreadable" in caplog.text


def test_augmented_views_are_cached_with_their_own_boxes(tmp_path, small_voc):
    recipe, ds, ex = _setup(tmp_path, small_voc, "aug.views=2", "aug.rotate=0", "aug.color=0")
    store = build(recipe, ds, ex, views=2, progress=False)
    assert len(store) == 3 * len(ds)
    assert store.view.tolist()[:3] == [0, 1, 2] and store.record.tolist()[:3] == [0, 0, 0]
    boxes0, _, _ = store.item_objects(0)
    np.testing.assert_allclose(boxes0, ds.records[0].boxes)
    for i in (1, 2):
        b, c, _d = store.item_objects(i)
        assert len(b) >= 1 and c.tolist() == [0] * len(b)
    # views are fixed: a rebuild in another cache gives the same boxes
    recipe2, _, _ = _setup(tmp_path / "again", small_voc, "aug.views=2", "aug.rotate=0", "aug.color=0")
    store2 = build(recipe2, ds, ex, views=2, progress=False)
    np.testing.assert_array_equal(store.boxes, store2.boxes)


@pytest.mark.parametrize("compress", ["none", "int8"])  # int8 rows are stored as two arrays: codes and scales
def test_a_build_with_views_copies_the_originals_a_build_without_them_cached(tmp_path, small_voc, compress):
    (small_voc / "JPEGImages" / "b.jpg").write_bytes(b"\xff\xd8\xff garbage")  # a failure is copied too
    overrides = ("aug.views=1", "aug.rotate=0", "aug.color=0", f"cache.compress={compress}")
    recipe, ds, ex = _setup(tmp_path, small_voc, *overrides)
    originals = build(recipe, ds, ex, progress=False)
    counting = CountingExtractor(ex)
    store = build(recipe, ds, counting, views=1, progress=False)
    assert counting.calls == 3  # the views of the three readable images: no original is extracted again
    scratch_recipe, _, _ = _setup(tmp_path / "scratch", small_voc, *overrides)
    scratch = build(scratch_recipe, ds, ex, views=1, progress=False)
    for name in ("offsets", "record", "view", "ok", "patch_boxes", "box_offsets", "boxes", "box_classes"):
        np.testing.assert_array_equal(getattr(store, name), getattr(scratch, name), err_msg=name)
    assert (
        store.failures == scratch.failures and len(store.failures) == 2 and "b.jpg" in store.failures[0]
    )  # and its view
    np.testing.assert_allclose(store.rows[:], scratch.rows[:], atol=1e-3)
    for i in np.flatnonzero(store.ok & (store.view == 0)):  # the originals' rows are the other cache's, bit for bit
        mine, theirs = store.item_slice(i), originals.item_slice(store.record[i])
        np.testing.assert_array_equal(store.rows.stored[mine], originals.rows.stored[theirs])
        if compress == "int8":
            np.testing.assert_array_equal(store.rows.scales[mine], originals.rows.scales[theirs])


def test_a_damaged_cache_of_the_originals_is_not_copied_but_extracted_again(tmp_path, small_voc, caplog):
    recipe, ds, ex = _setup(tmp_path, small_voc, "aug.views=1", "aug.rotate=0", "aug.color=0")
    originals = build(recipe, ds, ex, progress=False)
    with open(originals.path / "features.f16", "r+b") as f:
        f.truncate(100)
    counting = CountingExtractor(ex)
    store = build(recipe, ds, counting, views=1, progress=False)
    assert counting.calls == 2 * len(ds) and store.ok.all()
    assert "is damaged" in caplog.text and "extracting the original images again" in caplog.text


def test_compression_settings_change_the_key_and_fp16_keys_stay(tmp_path, small_voc):
    recipe, ds, ex = _setup(tmp_path, small_voc)
    fields = cache_fields(ds, ex, 0, cache_spec(recipe, ex))
    assert "compress" not in fields and cache_fields(ds, ex, 0, cache_spec(recipe, ex, codec=FeatureCodec())) == fields
    keys = {key(fields)}
    for overrides in (
        ["cache.compress=int8"],
        ["cache.compress=pca", "cache.pca_dim=4"],
        ["cache.compress=pca", "cache.pca_dim=6"],
        ["cache.compress=pca_int8", "cache.pca_dim=4"],
    ):
        r = tiny_recipe(tmp_path, small_voc, *overrides)
        keys.add(key(cache_fields(ds, ex, 0, cache_spec(r, ex, progress=False))))
    assert len(keys) == 5
    r = tiny_recipe(tmp_path, small_voc, "cache.compress=pca", "cache.pca_dim=2000")
    with pytest.raises(CodecError, match="at most 1280"):
        cache_spec(r, ex)


def test_a_torn_pca_projection_is_a_clear_error_naming_it(tmp_path, small_voc):
    recipe, _, ex = _setup(tmp_path, small_voc, "cache.compress=pca", "cache.pca_dim=6")
    cache_spec(recipe, ex, progress=False)
    (projection,) = (tmp_path / "cache" / "projections").iterdir()
    projection.write_bytes(projection.read_bytes()[:100])  # a write cut short after the fact
    with pytest.raises(
        CacheError,
        match=re.escape(f"the PCA projection {projection} cannot be read") + ".*" + re.escape(f"rm {projection}"),
    ):
        cache_spec(recipe, ex, progress=False)
    projection.unlink()  # the way the message gives: the next call fits it again
    assert cache_spec(recipe, ex, progress=False).codec.components.shape == (6, 1280)


def _fp16(ex, rec):
    return ex(load_image(rec.path)).numpy().astype(np.float16).astype(np.float32)


def test_pca_is_fitted_on_the_training_split_and_reused_by_the_others(tmp_path, small_voc):
    from sklearn.decomposition import PCA

    recipe, ds, ex = _setup(tmp_path, small_voc, "cache.compress=pca", "cache.pca_dim=6")
    counting = CountingExtractor(ex)
    store = build(recipe, ds, counting, progress=False)
    assert counting.calls == 2 * len(ds)  # the PCA sample (all 4 images, pca_images >= 4), then the cache
    assert store.feature_dim == 6 and store.rows.shape == (store.num_patches, 6) and store.compress == "pca"
    # the reference: sklearn's PCA of the fp16 features of every patch of the training images
    ref = PCA(6, svd_solver="full").fit(np.concatenate([_fp16(ex, r) for r in ds.records]))
    codec = cache_spec(recipe, ex).codec
    np.testing.assert_allclose(codec.components, ref.components_, atol=1e-4)
    # stored in fp16: 3 significant digits
    np.testing.assert_allclose(
        store.rows[store.item_slice(1)], ref.transform(_fp16(ex, ds.records[1])), rtol=1e-3, atol=1e-3
    )
    # the val split is stored through the training split's projection, which is fitted once
    val = open_split(recipe.data, "val")
    again = CountingExtractor(ex)
    val_store = build(recipe, val, again, progress=False)
    assert again.calls == len(val)
    assert val_store.fields["projection"] == store.fields["projection"] == codec.digest
    assert len(list((tmp_path / "cache" / "projections").iterdir())) == 1
    # the store maps its rows back to the trunk's space on its own, for features pooled by their maximum
    s = val_store.item_slice(0)
    np.testing.assert_allclose(val_store.trunk_rows[s], val_store.rows[s] @ ref.components_ + ref.mean_, atol=1e-3)
    assert val_store.trunk_rows.shape == (val_store.num_patches, 1280)
    np.testing.assert_allclose(
        val_store.rows[val_store.item_slice(0)], ref.transform(_fp16(ex, val.records[0])), rtol=1e-3, atol=1e-3
    )


@pytest.mark.parametrize("compress", ["int8", "pca_int8"])
def test_a_compressed_cache_is_encoded_from_the_fp16_cache_without_the_trunk(tmp_path, small_voc, compress):
    recipe, ds, ex = _setup(tmp_path, small_voc)
    build(recipe, ds, ex, progress=False)
    r = tiny_recipe(tmp_path, small_voc, f"cache.compress={compress}", "cache.pca_dim=5")
    counting = CountingExtractor(ex)
    store = build(r, ds, counting, progress=False)
    assert counting.calls == 0  # the PCA sample too is read from the fp16 cache
    dim = 1280 if compress == "int8" else 5
    files = ["features.u8", "index.npz", "meta.json", "scales.f32"] + (["projection.npz"] if dim == 5 else [])
    names = [f.name for f in store.path.iterdir()]
    assert sorted(n for n in names if not n.startswith("verified-")) == sorted(files)
    assert len(names) == len(files) + 1  # and this boot's checksum stamp
    assert (store.path / "features.u8").stat().st_size == store.num_patches * dim
    assert (store.path / "scales.f32").stat().st_size == store.num_patches * 8
    # the same cache as one built from the images
    fresh_recipe = tiny_recipe(tmp_path / "fresh", small_voc, f"cache.compress={compress}", "cache.pca_dim=5")
    fresh = build(fresh_recipe, ds, ex, progress=False)
    assert fresh.path.name == store.path.name
    np.testing.assert_array_equal(store.rows.stored, fresh.rows.stored)
    np.testing.assert_array_equal(store.rows.scales, fresh.rows.scales)
    np.testing.assert_array_equal(store.offsets, fresh.offsets)
    np.testing.assert_array_equal(store.patch_boxes, fresh.patch_boxes)


def test_cache_verify_checks_every_kind_of_cache_folder(tmp_path, small_voc):
    """Features, unlock's boundary maps and the per-layer vectors: each listed, each found damaged when a byte flips."""
    from typer.testing import CliRunner

    from patchnet.backbones import backbone_spec, unlock_split
    from patchnet.cli import app
    from patchnet.features.stages import build_stage_extractor, stage_features, stage_recipe
    from patchnet.training.unlock import build_maps

    recipe, ds, ex = _setup(tmp_path, small_voc)
    features = build(recipe, ds, ex, progress=False)
    maps = build_maps(
        cache_spec(recipe, ex), ds, ex, unlock_split(backbone_spec("efficientnet_lite0"), 1), progress=False
    )
    r = stage_recipe(recipe, "whole")
    stage_features(r, ds, build_stage_extractor(r), progress=False)
    (layers,) = (p.parent for p in (tmp_path / "cache" / "layers").glob("*/meta.json"))
    cache_dir = str(tmp_path / "cache")
    result = CliRunner().invoke(app, ["cache", "verify", "--cache-dir", cache_dir])
    assert result.exit_code == 0, result.output
    for folder in (features.path.name, maps.path.name, f"layers/{layers.name}"):
        assert f"{folder}  ok" in result.output
    assert "3 caches, 0 damaged" in result.output
    for f in (maps.path / "maps.f16", layers / "head.f32"):
        data = bytearray(f.read_bytes())
        data[8] ^= 0xFF
        f.write_bytes(bytes(data))
    result = CliRunner().invoke(app, ["cache", "verify", "--cache-dir", cache_dir])
    assert result.exit_code == 1 and "3 caches, 2 damaged" in result.output
    assert f"layers/{layers.name}  head.f32 does not match its checksum" in result.output
    assert f"{maps.path.name}  maps.f16 does not match its checksum" in result.output
    assert f"{features.path.name}  ok" in result.output
