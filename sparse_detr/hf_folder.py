"""What a Hugging Face DETR folder (as `save_pretrained` writes it) holds, without torch: config
checks recognise one for `init_from=`, and `models.hf_detr` loads it."""
from __future__ import annotations

from pathlib import Path

CONFIG_NAME = "config.json"
SAFETENSORS, PYTORCH_BIN = "model.safetensors", "pytorch_model.bin"


def is_hf_detr_folder(path: str | Path) -> bool:
    folder = Path(path).expanduser()
    return folder.is_dir() and (folder / CONFIG_NAME).is_file()
