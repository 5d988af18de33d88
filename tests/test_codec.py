import numpy as np
import pytest
import torch

from patchnet.store.codec import CodecError, FeatureCodec, Moments, dequantize_rows, quantize_rows


def test_int8_rows_round_trip_within_half_a_step():
    rng = np.random.default_rng(0)
    # ReLU6-like rows (mostly zero, a few large values) and signed rows of very different ranges
    sparse = np.where(rng.random((50, 64)) < 0.6, 0.0, rng.uniform(0, 6, (50, 64)))
    signed = rng.normal(0, 1, (50, 64)) * rng.uniform(0.01, 100, (50, 1)) + rng.normal(0, 5, (50, 1))
    for x in (sparse.astype(np.float32), signed.astype(np.float32)):
        codes, scales = quantize_rows(x)
        assert codes.dtype == np.uint8 and scales.dtype == np.float32 and scales.shape == (len(x), 2)
        back = dequantize_rows(codes, scales)
        half_step = (x.max(1) - x.min(1)) / 510
        assert np.all(np.abs(back - x).max(1) <= half_step * (1 + 1e-4) + 1e-6)
        # every row uses the whole range of codes: its minimum is 0 and its maximum 255
        assert (codes.min(1) == 0).all() and (codes.max(1) == 255).all()
        np.testing.assert_allclose(dequantize_rows(codes[3], scales[3]), back[3])  # one row alone
    constant = np.full((2, 5), 1.5, np.float32)
    np.testing.assert_array_equal(dequantize_rows(*quantize_rows(constant)), constant)
    codes, scales = quantize_rows(np.zeros((0, 5), np.float32))
    assert codes.shape == (0, 5) and scales.shape == (0, 2)


def test_streamed_pca_matches_sklearn():
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(1)
    x = (rng.normal(size=(600, 12)) * np.linspace(3, 0.1, 12)) @ np.linalg.qr(rng.normal(size=(12, 12)))[0] + 4.0
    moments = Moments(12)
    for part in np.array_split(x, 5):  # streamed in uneven batches
        moments.add(part)
    mean, comps, kept = moments.pca(5)
    ref = PCA(5, svd_solver="full").fit(x)
    np.testing.assert_allclose(mean, ref.mean_, atol=1e-10)
    np.testing.assert_allclose(comps, ref.components_, atol=1e-8)  # same signs as sklearn
    np.testing.assert_allclose(kept, ref.explained_variance_ratio_.sum(), rtol=1e-10)
    with pytest.raises(CodecError, match="at least 2"):
        Moments(3).pca(1)


def _projection(d=16, k=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=d).astype(np.float32), np.linalg.qr(rng.normal(size=(d, k)))[0].T.astype(np.float32)


@pytest.mark.parametrize("compress", ["none", "int8", "pca", "pca_int8"])
def test_codecs_store_what_the_head_reads(compress):
    mean, comps = _projection()
    codec = FeatureCodec(compress, mean, comps) if compress.startswith("pca") else FeatureCodec(compress)
    x = torch.from_numpy(np.random.default_rng(2).uniform(0, 6, (30, 16)).astype(np.float32))
    stored = codec.encode(x)
    dim = 4 if compress.startswith("pca") else 16
    assert codec.dim(16) == dim
    for name, (dtype, width) in codec.layout(16).items():
        assert stored[name].dtype == dtype and stored[name].shape == (30, width)
    # the reference: fp16 input, the projection, then fp16 or half a quantisation step of error
    ref = x.numpy().astype(np.float16).astype(np.float32)
    if compress.startswith("pca"):
        ref = (ref - mean) @ comps.T
    tol = (ref.max(1) - ref.min(1))[:, None] / 510 + 1e-5 if compress.endswith("int8") else 1e-2
    assert np.all(np.abs(codec.roundtrip(x) - ref) <= tol)


def test_codec_identity_and_checkpoint_state(tmp_path):
    mean, comps = _projection()
    assert FeatureCodec().fields() == {}  # fp16 caches keep the keys they had before codecs
    assert FeatureCodec("int8").fields() == {"compress": "int8"}
    pca = FeatureCodec("pca", mean, comps)
    assert pca.fields() == {"compress": "pca", "projection": pca.digest}
    assert FeatureCodec("pca", mean, comps * 1.001).digest != pca.digest
    assert FeatureCodec("pca_int8", mean, comps).fields()["projection"] == pca.digest
    torch.save({"codec": pca.state_dict()}, tmp_path / "c.pt")
    back = FeatureCodec.from_state(torch.load(tmp_path / "c.pt", weights_only=True)["codec"])
    assert back.compress == "pca" and back.digest == pca.digest
    assert FeatureCodec.from_state(None).compress == "none"
    with pytest.raises(CodecError, match="projection"):
        FeatureCodec("pca")
    with pytest.raises(CodecError, match="none, int8, pca or pca_int8"):
        FeatureCodec("fp8")
