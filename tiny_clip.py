"""Test support: a tiny random-weight CLIP, written in the on-disk layout of a real one.

No CLIP weights can be had on the project's machines, so the tests build this one
and load it through the production loading code.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import pre_tokenizers
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

TINY_IMAGE_SIZE = 32
TINY_DIMENSION = 16


def write_tiny_clip(folder: Path, image_size: int = TINY_IMAGE_SIZE) -> Path:
    """A random-weight CLIP in the on-disk layout of sentence-transformers/clip-ViT-B-32.

    image_size is the side of the square its image processor makes (clip-ViT-B-32's is 224).
    """
    module = folder / "0_CLIPModel"
    module.mkdir(parents=True)
    # Byte-level BPE: every byte symbol alone and at the end of a word, a few merges, then
    # CLIP's special tokens last, as in the real vocabulary (its end token has the highest id).
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = [("r", "e"), ("re", "d</w>"), ("b", "l"), ("bl", "u"), ("blu", "e</w>")]
    tokens = alphabet + [symbol + "</w>" for symbol in alphabet] + [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (module / "vocab.json").write_text(json.dumps({token: index for index, token in enumerate(tokens)}))
    (module / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    CLIPTokenizer.from_pretrained(str(module), model_max_length=77).save_pretrained(str(module))
    CLIPImageProcessor(size={"shortest_edge": image_size},
                       crop_size={"height": image_size, "width": image_size}).save_pretrained(str(module))
    config = CLIPConfig(
        # eos_token_id=2 is what the real clip-ViT-B-32 config says (the text tower then pools at the
        # highest token id, the end token); pad id 1 and bos id 0 are its values too.
        text_config=dict(vocab_size=len(tokens), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77,
                         bos_token_id=0, pad_token_id=1, eos_token_id=2),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=8),
        projection_dim=TINY_DIMENSION,
    )
    torch.manual_seed(1234)
    model = CLIPModel(config)
    config.save_pretrained(str(module))
    torch.save(model.state_dict(), module / "pytorch_model.bin")
    (folder / "modules.json").write_text(json.dumps(
        [{"idx": 0, "name": "0", "path": "0_CLIPModel", "type": "sentence_transformers.models.CLIPModel"}]))
    (folder / "config_sentence_transformers.json").write_text(json.dumps(
        {"__version__": {"sentence_transformers": "2.0.0"}}))
    return folder
