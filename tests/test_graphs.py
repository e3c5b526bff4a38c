"""Tests of samba_pipeline.graphs."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy.spatial.distance import cdist

from samba_pipeline.errors import SambaInputError
from samba_pipeline.graphs import cosine_graph, region_map


def test_cosine_graph_matches_references():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 12)) + rng.normal(size=12) * 5  # non-zero means
    g = cosine_graph(x)
    xc = x - x.mean(0)
    np.testing.assert_allclose(g, 1 - cdist(xc.T, xc.T, "cosine"), atol=1e-12)
    np.testing.assert_allclose(g, np.corrcoef(x, rowvar=False), atol=1e-12)
    np.testing.assert_allclose(np.diag(g), 1.0)
    np.testing.assert_allclose(g, g.T)
    # uncentred: plain cosine of the raw columns
    np.testing.assert_allclose(
        cosine_graph(x, center=False), 1 - cdist(x.T, x.T, "cosine"), atol=1e-12
    )


def test_cosine_graph_nan_and_constant_columns():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 5))
    x[:, 1] = np.nan  # e.g. a parcel below the coverage threshold
    x[3, 4] = np.inf
    x[:, 2] = 0.1  # constant: its centred version is (numerically) zero
    with np.errstate(all="raise"):  # no division by zero anywhere
        g = cosine_graph(x)
    assert np.isnan(g[1]).all() and np.isnan(g[:, 1]).all()
    assert np.isnan(g[4]).all() and np.isnan(g[:, 4]).all()
    assert g[2, 0] == 0 and g[0, 2] == 0 and g[2, 3] == 0
    assert g[2, 2] == 1 and g[0, 0] == 1
    ref = np.corrcoef(x[:, [0, 3]], rowvar=False)
    np.testing.assert_allclose(g[np.ix_([0, 3], [0, 3])], ref, atol=1e-12)
    # all-zero column, uncentred
    y = rng.normal(size=(20, 3))
    y[:, 0] = 0
    g = cosine_graph(y, center=False)
    assert (g[0, 1:] == 0).all() and g[0, 0] == 1
    with pytest.raises(SambaInputError, match="2-D"):
        cosine_graph(np.zeros(5))


def _schaefer_tables():
    coarse = pd.DataFrame(
        {
            "index": [1, 2, 3, 4],
            "name": [
                "7Networks_LH_Vis_1",
                "7Networks_LH_Vis_2",
                "7Networks_RH_Vis_1",
                "7Networks_LH_Default_PFC_1",
            ],
        }
    )
    fine = pd.DataFrame(
        {
            "index": [1, 2, 3, 4, 5],
            "name": [
                "7Networks_LH_Vis_1",
                "7Networks_LH_Vis_7",
                "7Networks_RH_Vis_3",
                "7Networks_LH_Default_PFC_4",
                "7Networks_LH_Default_Temp_2",
            ],
        }
    )
    return coarse, fine


def test_region_map_from_schaefer_names():
    coarse, fine = _schaefer_tables()
    m = region_map(coarse, fine)
    assert m.attrs["method"] == "names"
    assert m.index.tolist() == fine["name"].tolist()
    assert m.columns.tolist() == coarse["name"].tolist()
    expected = np.array(
        [
            [1, 1, 0, 0],
            [1, 1, 0, 0],
            [0, 0, 1, 0],
            [0, 0, 0, 1],
            [0, 0, 0, 1],  # LH_Default of any sub-area
        ]
    )
    np.testing.assert_array_equal(m.to_numpy(), expected)
    # demo-style names ('DemoNetworks_...') parse the same way
    demo_c = pd.DataFrame({"name": ["DemoNetworks_LH_Vis_1", "DemoNetworks_RH_Vis_1"]})
    demo_f = pd.DataFrame({"name": ["DemoNetworks_RH_Vis_2", "DemoNetworks_LH_Vis_5"]})
    np.testing.assert_array_equal(region_map(demo_c, demo_f).to_numpy(), [[0, 1], [1, 0]])


def test_region_map_from_region_columns():
    coarse = pd.DataFrame(
        {"index": [1, 2, 3], "name": ["a", "b", "c"], "region": ["LH_Vis", "LH_Vis", "RH_SomMot"]}
    )
    fine = pd.DataFrame(
        {
            "index": [1, 2, 3],
            "name": ["x", "y", "z"],
            "region": ["RH_SomMot", "LH_Vis", "RH_SomMot"],
        }
    )
    m = region_map(coarse, fine)
    assert m.attrs["method"] == "region"
    np.testing.assert_array_equal(m.to_numpy(), [[0, 0, 1], [1, 1, 0], [0, 0, 1]])
    # a fine parcel whose region no coarse parcel has, and no images: error naming it
    fine.loc[2, "region"] = "RH_Limbic"
    with pytest.raises(SambaInputError, match="1 fine parcel.*: z"):
        region_map(coarse, fine)


def _nested_images():
    """Coarse 2 mm atlas with 2 parcels; fine 1 mm atlas with 4 parcels nested inside."""
    coarse = np.zeros((4, 4, 2), np.int16)
    coarse[:2] = 10
    coarse[2:] = 20
    c_aff = np.diag([2.0, 2.0, 2.0, 1.0])
    fine = np.zeros((8, 8, 4), np.int16)
    fine[:4, :4] = 1
    fine[:4, 4:] = 2
    fine[4:, :5] = 3
    fine[4:, 5:] = 4
    f_aff = np.diag([1.0, 1.0, 1.0, 1.0])
    f_aff[:3, 3] = -0.5  # 1 mm voxels tile the 2 mm voxels exactly
    return nib.Nifti1Image(coarse, c_aff), nib.Nifti1Image(fine, f_aff)


def test_region_map_from_images_only(tmp_path):
    c_img, f_img = _nested_images()
    coarse = pd.DataFrame({"index": [10, 20], "name": ["A", "B"]})
    fine = pd.DataFrame({"index": [1, 2, 3, 4], "name": ["a1", "a2", "b1", "b2"]})
    m = region_map(coarse, fine, coarse_img=c_img, fine_img=f_img)
    assert m.attrs["method"] == "overlap"
    np.testing.assert_array_equal(m.to_numpy(), [[1, 0], [1, 0], [0, 1], [0, 1]])
    # from files too
    nib.save(c_img, tmp_path / "c.nii.gz")
    nib.save(f_img, tmp_path / "f.nii.gz")
    m2 = region_map(coarse, fine, coarse_img=tmp_path / "c.nii.gz", fine_img=tmp_path / "f.nii.gz")
    pd.testing.assert_frame_equal(m, m2)


def test_region_map_names_then_overlap_fallback():
    c_img, f_img = _nested_images()
    coarse = pd.DataFrame(
        {"index": [10, 20], "name": ["7Networks_LH_Vis_1", "7Networks_RH_Vis_1"]}
    )
    fine = pd.DataFrame(
        {
            "index": [1, 2, 3, 4],
            "name": ["7Networks_LH_Vis_1", "Thalamus_L", "7Networks_RH_Vis_2", "Thalamus_R"],
        }
    )
    with pytest.raises(SambaInputError, match="Thalamus_L, Thalamus_R"):
        region_map(coarse, fine)
    m = region_map(coarse, fine, coarse_img=c_img, fine_img=f_img)
    assert m.attrs["method"] == "names+overlap"
    np.testing.assert_array_equal(m.to_numpy(), [[1, 0], [1, 0], [0, 1], [0, 1]])


def test_region_map_overlap_leaves_parcel_unfed():
    c_img, f_img = _nested_images()
    data = np.asarray(c_img.dataobj).copy()
    data[2:] = 0  # coarse parcel B gone: fine parcels b1, b2 overlap nothing
    c_img = nib.Nifti1Image(data, c_img.affine)
    coarse = pd.DataFrame({"index": [10, 20], "name": ["A", "B"]})
    fine = pd.DataFrame({"index": [1, 2, 3, 4], "name": ["a1", "a2", "b1", "b2"]})
    with pytest.raises(SambaInputError, match="2 fine parcel.*b1, b2"):
        region_map(coarse, fine, coarse_img=c_img, fine_img=f_img)
