"""numpy's OpenBLAS runs on one thread inside ``models.blas.single_blas_thread`` (the die
blocks' phase correlations: many tiny products), with its own thread count back outside,
and the products are the same."""

import numpy as np
import pytest

from models import blas


def _threads() -> list[int]:
    return [lib["num_threads"] for lib in blas.numpy_blas().info()]


def test_one_thread_inside_and_restored_outside() -> None:
    if not _threads():
        pytest.skip("numpy's BLAS is not one threadpoolctl knows")
    with blas.numpy_blas().limit(limits=2):
        assert set(_threads()) == {2}
        with blas.single_blas_thread():
            assert set(_threads()) == {1}
            with blas.single_blas_thread():  # re-entrant
                assert set(_threads()) == {1}
            assert set(_threads()) == {1}
        assert set(_threads()) == {2}


def test_products_are_the_same_on_one_thread() -> None:
    """Phase correlation's upsampled DFT (complex products), as die-to-die runs it."""
    from skimage.registration import phase_cross_correlation

    rng = np.random.default_rng(0)
    a = rng.random((128, 128))
    b = np.roll(a, (3, -2), axis=(0, 1)) + 0.05 * rng.random((128, 128))
    k = np.exp(-2j * np.pi * rng.random((30, 128)))
    want = (phase_cross_correlation(a, b, upsample_factor=20, normalization=None)[0],
            np.tensordot(k, a.astype(complex), axes=(1, -1)))
    with blas.single_blas_thread():
        got = (phase_cross_correlation(a, b, upsample_factor=20, normalization=None)[0],
               np.tensordot(k, a.astype(complex), axes=(1, -1)))
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
