"""Describe one photo with a file from `tokenret export`, with onnxruntime, Pillow and numpy only."""

import json
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps

session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
conv = json.loads(session.get_modelmeta().custom_metadata_map["tokenret"])["input_convention"]
image = ImageOps.exif_transpose(Image.open(sys.argv[2])).convert("RGB")
if conv["max_size"]:  # longest side at most max_size, never enlarged (Token: 1024; SuperGlobal: as is)
    image.thumbnail((conv["max_size"], conv["max_size"]), Image.Resampling.LANCZOS, reducing_gap=None)
pixels = np.asarray(image, dtype=np.float32) / 255.0
if conv["channel_order"] == "BGR":
    pixels = pixels[:, :, ::-1]
pixels = (pixels - np.float32(conv["mean"])) / np.float32(conv["std"])
(descriptor,) = session.run(["descriptors"], {"images": pixels.transpose(2, 0, 1)[None].copy()})[0]
print(json.dumps(descriptor.tolist()))  # L2-normalised, single scale
