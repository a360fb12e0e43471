"""(embedding, location) files in every format, and the image CSV readers (folder and tar)."""

import numpy as np
import pytest
import torch

from locdiff_ext.data import EmbeddingDataset, load_dataset, read_image_csv
from locdiff_ext.encoders import image_to_tensor

from helpers import region_dataset


def test_data_formats_roundtrip(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data, _ = region_dataset(20, seed=8)
    for suffix in (".npz", ".safetensors"):
        back = load_dataset(data.save(tmp_path / f"d{suffix}"))
        assert torch.equal(back.embeddings, data.embeddings) and torch.equal(back.coords, data.coords)
    np.save(tmp_path / "e.npy", data.embeddings.numpy())
    np.save(tmp_path / "c.npy", data.coords.numpy())
    assert torch.equal(load_dataset(tmp_path / "e.npy", tmp_path / "c.npy").coords, data.coords)
    table = pa.table({"lat": data.coords[:, 0].numpy(), "lon": data.coords[:, 1].numpy(),
                      "embedding": data.embeddings.numpy().tolist()})
    pq.write_table(table, tmp_path / "d.parquet")
    assert torch.allclose(load_dataset(tmp_path / "d.parquet").embeddings, data.embeddings)
    # bad data
    with pytest.raises(ValueError, match="latitude"):
        EmbeddingDataset(torch.randn(2, 3), torch.tensor([[91.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="rows"):
        EmbeddingDataset(torch.randn(3, 3), torch.zeros(2, 2))
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 junk")
    with pytest.raises(ValueError, match="cannot be read"):
        load_dataset(tmp_path / "junk.npz")
    with pytest.raises(FileNotFoundError):
        load_dataset(tmp_path / "none.npz")
    assert EmbeddingDataset(torch.randn(1, 2), torch.tensor([[0.0, 190.0]])).coords[0, 1] == -170.0


def test_csv_reader_folder_and_tar(image_set):
    refs, coords, missing = read_image_csv(image_set / "mp16.csv", image_set / "imgs")
    assert len(refs) == 40 and coords.shape == (40, 2) and missing == [str(image_set / "imgs" / "sub/missing.jpg")]
    trefs, tcoords, tmissing = read_image_csv(image_set / "mp16.csv", image_set / "imgs.tar")
    assert len(trefs) == 40 and torch.equal(tcoords, coords) and len(tmissing) == 1
    a = image_to_tensor(refs[3], 32)
    b = image_to_tensor(trefs[3], 32)
    assert torch.equal(a, b)  # same pixels from the folder and from the archive
    (image_set / "bad.csv").write_text("name,where\nx,1\n")
    with pytest.raises(ValueError, match="image column"):
        read_image_csv(image_set / "bad.csv", image_set / "imgs")


def test_huge_longitudes_in_data_files_wrap_exactly():
    """The twin of the kernels' exact wrap (issue 9, defect 7): 1e20 is 280 (mod 360), i.e. -80 degrees;
    remainder(lon + 180, 360) - 180 gave 100, since 1e20 + 180 rounds to 1e20."""
    c = torch.tensor([[10.0, 1e20], [0.0, -1e20], [5.0, 190.0], [1.0, -180.0], [2.0, 179.5]], dtype=torch.float64)
    assert EmbeddingDataset(torch.randn(5, 3), c).coords[:, 1].tolist() == [-80.0, 80.0, -170.0, -180.0, 179.5]
