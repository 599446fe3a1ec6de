"""PixelTable: rescale + normalize by table lookup gives transformers' own pixel values, bit for bit, on real images."""

from __future__ import annotations

import os

import numpy as np
import pydicom.data
import pytest
import torch
from PIL import Image
from skimage import data as skdata
from transformers import CLIPImageProcessorPil

from lightning_meddpo.data.collate import PairEncoder
from lightning_meddpo.data.images import load_image
from lightning_meddpo.data.pixels import PixelTable
from lightning_meddpo.data.records import Turn

DICOM_DIR = os.path.join(os.path.dirname(pydicom.data.__file__), "test_files")


@pytest.fixture(scope="module")
def medical_images(tmp_path_factory) -> list[Image.Image]:
    """A CT slice (16-bit PNG from DICOM), a colour ultrasound frame, a retina photograph and a pathology tile,
    as the data path loads them (sizes 128 px to 1411 px: enlarged and reduced)."""
    out = tmp_path_factory.mktemp("pixels")
    ct = pydicom.dcmread(os.path.join(DICOM_DIR, "CT_small.dcm")).pixel_array
    Image.fromarray(ct.astype(np.uint16)).save(out / "ct.png")
    us = pydicom.dcmread(os.path.join(DICOM_DIR, "examples_rgb_color.dcm")).pixel_array
    Image.fromarray(us[0] if us.ndim == 4 else us).save(out / "us.png")
    Image.fromarray(skdata.retina()).save(out / "retina.png")
    Image.fromarray(skdata.immunohistochemistry()).save(out / "ihc.png")
    return [load_image(out / name) for name in ("ct.png", "us.png", "retina.png", "ihc.png")]


def llava_med_image_processor(**overrides) -> CLIPImageProcessorPil:
    """LLaVA-Med v1.5's CLIP preprocessing (336 px, OpenAI mean and std), built offline."""
    settings = dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_center_crop=True)
    return CLIPImageProcessorPil(**{**settings, **overrides})


@pytest.mark.parametrize("overrides", [{}, {"image_mean": 0.5, "image_std": 0.25}, {"rescale_factor": 1 / 127.5}])
def test_table_equals_the_processor_bitwise(medical_images, overrides):
    processor = llava_med_image_processor(**overrides)
    table = PixelTable.for_image_processor(processor)
    assert table is not None
    for image in medical_images:
        expected = processor(images=[image], return_tensors="pt")["pixel_values"]
        raw = processor(images=[image], return_tensors="pt", do_rescale=False, do_normalize=False)["pixel_values"]
        assert raw.dtype == torch.uint8
        got = table(raw)
        assert got.dtype == expected.dtype == torch.float32 and got.shape == expected.shape == (1, 3, 336, 336)
        assert torch.equal(got, expected)


def test_pair_encoder_gives_the_processors_values(medical_images, tiny_processor):
    encoder = PairEncoder(tiny_processor, max_length=256)
    assert encoder._pixels is not None  # the tiny LLaVA's CLIP processor takes the table
    prompt = (Turn("human", "<image>\nWhat is shown?"),)
    text = encoder.render_prompt(prompt)
    for image in medical_images:
        ours = encoder.encode_prompt(text, image)
        theirs = tiny_processor(text=[text], images=[image], return_tensors="pt")
        assert torch.equal(ours.image.pixel_values, theirs["pixel_values"])
        assert torch.equal(ours.tokens["input_ids"], theirs["input_ids"][0])
        assert torch.equal(encoder.encode_images(image).pixel_values, tiny_processor.image_processor(images=[image], return_tensors="pt")["pixel_values"])


def test_processors_with_their_own_pipeline_keep_it():
    from transformers import Qwen2VLImageProcessorPil

    assert PixelTable.for_image_processor(Qwen2VLImageProcessorPil()) is None  # patches: its own _preprocess
    assert PixelTable.for_image_processor(llava_med_image_processor(do_normalize=False)) is None
    assert PixelTable.for_image_processor(llava_med_image_processor(do_rescale=False)) is None
    assert PixelTable.for_image_processor(None) is None

    class OwnNormalize(CLIPImageProcessorPil):  # a family that changes one step keeps its whole pipeline
        def normalize(self, image, mean, std, **kwargs):
            return super().normalize(image, mean, std, **kwargs) * 2

    assert PixelTable.for_image_processor(OwnNormalize()) is None


def test_refuses_what_is_not_8bit_pixels():
    table = PixelTable.for_image_processor(llava_med_image_processor())
    with pytest.raises(ValueError, match="uint8"):
        table(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="channels"):
        table(torch.zeros(1, 4, 4, 4, dtype=torch.uint8))
    grey = PixelTable.for_image_processor(llava_med_image_processor(image_mean=0.5, image_std=0.5))
    values = grey(torch.tensor(np.array([0, 255], dtype=np.uint8)).view(1, 1, 1, 2).expand(1, 3, 1, 2).contiguous())
    assert torch.equal(values, torch.tensor([-1.0, 1.0]).view(1, 1, 1, 2).expand(1, 3, 1, 2))  # (x/255 - .5) / .5
