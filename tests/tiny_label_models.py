"""Random-weight labelling models built from configs and saved with their processors — no download at all.

``make_*(path)`` writes a folder that ``from_pretrained(path, local_files_only=True)`` and
``AutoProcessor.from_pretrained(path)`` load, like a hub checkpoint. By default the models are TINY
(a forward on a 64–128 px image takes milliseconds on a CPU); ``full_size=True`` keeps the real default
config sizes (GroundingDinoConfig(), SamHQConfig(), Mask2FormerConfig(), ...) and processor sizes, for
sizing a GPU without downloading weights. The weights are random: the outputs have the right shapes and
types but mean nothing.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cfmae_cli.labeling.coco_panoptic import COCO_PANOPTIC_CLASSES

#: Plain lowercase words the tiny BERT vocabulary knows (others become [UNK], which is fine).
TINY_WORDS = ["object", "cat", "dog", "coffee", "cup", "tench", "golden", "retriever", "astronaut", "rocket",
              "chelsea", "a", "an", "the", "of", "photo", "and", "fish", "bird", "car", "person", "thing"]
#: Special ids Grounding DINO relies on (its SPECIAL_TOKENS are [CLS], [SEP], '.', '?').
_BERT_FIXED = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]", 1012: ".", 1029: "?"}


def write_bert_vocab(path: Path, size: int = 1030 + len(TINY_WORDS)) -> list[str]:
    """A BERT ``vocab.txt`` with the standard special ids, unused slots elsewhere and :data:`TINY_WORDS`."""
    fixed_words = [w for w in TINY_WORDS]
    vocab = []
    for i in range(size):
        if i in _BERT_FIXED:
            vocab.append(_BERT_FIXED[i])
        elif i >= 1030 and fixed_words:
            vocab.append(fixed_words.pop(0))
        else:
            vocab.append(f"[unused{i}]")
    Path(path).mkdir(parents=True, exist_ok=True)
    (Path(path) / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return vocab


def _swin(image_size: int, embed_dim: int, heads: list[int], **kw):
    from transformers import SwinConfig

    return SwinConfig(image_size=image_size, patch_size=4, embed_dim=embed_dim, depths=[1, 1, 1, 1],
                      num_heads=heads, window_size=4, **kw)


def _labels(num_labels: int) -> dict:
    names = COCO_PANOPTIC_CLASSES if num_labels == len(COCO_PANOPTIC_CLASSES) else [
        f"class_{i}" for i in range(num_labels)]
    return {"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}


def make_grounding_dino(path: str | Path, full_size: bool = False, seed: int = 0) -> Path:
    """Grounding DINO (Swin + BERT) with a BERT tokenizer; processor resizes to 64–128 px when tiny."""
    from transformers import (BertConfig, BertTokenizer, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoImageProcessor, GroundingDinoProcessor)

    path = Path(path)
    torch.manual_seed(seed)
    if full_size:
        config = GroundingDinoConfig()
        vocab = write_bert_vocab(path, config.text_config.vocab_size)
        image_processor = GroundingDinoImageProcessor()
    else:
        vocab = write_bert_vocab(path)
        text = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=64, max_position_embeddings=64)
        # d_model must be a multiple of 32 (GroupNorm(32, d_model)); decoder_layers >= 2 (tied box heads).
        config = GroundingDinoConfig(
            backbone_config=_swin(64, 8, [1, 1, 1, 1], out_indices=[2, 3, 4]), text_config=text,
            num_queries=30, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
            d_model=32, encoder_attention_heads=2, decoder_attention_heads=2, encoder_n_points=1,
            decoder_n_points=1, max_text_len=32)
        image_processor = GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 128})
    model = GroundingDinoForObjectDetection(config).eval()
    if not full_size:  # random text features are large: every score would be ~1; spread them over ~0.3-0.9
        with torch.no_grad():
            norm = model.model.encoder.layers[-1].text_enhancer_layer.layer_norm_after
            norm.weight.fill_(0.1)
            norm.bias.zero_()
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    model.save_pretrained(path)
    GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


def _sam_configs(hq: bool, full_size: bool):
    from transformers import (SamConfig, SamHQConfig, SamHQMaskDecoderConfig, SamHQPromptEncoderConfig,
                              SamHQVisionConfig, SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig)

    if full_size:
        return (SamHQConfig() if hq else SamConfig()), 1024
    size = 64
    vision_cls, prompt_cls, decoder_cls = ((SamHQVisionConfig, SamHQPromptEncoderConfig, SamHQMaskDecoderConfig)
                                           if hq else (SamVisionConfig, SamPromptEncoderConfig, SamMaskDecoderConfig))
    vision = vision_cls(hidden_size=32, output_channels=32, num_hidden_layers=2, num_attention_heads=2,
                        image_size=size, patch_size=8, window_size=4, global_attn_indexes=[1], num_pos_feats=16,
                        mlp_dim=64)
    prompt = prompt_cls(hidden_size=32, image_size=size, patch_size=8, mask_input_channels=4)
    decoder_kw = dict(hidden_size=32, mlp_dim=64, num_hidden_layers=2, num_attention_heads=2,
                      iou_head_hidden_dim=32)
    if hq:
        decoder_kw["vit_dim"] = 32
    decoder = decoder_cls(**decoder_kw)
    cls = SamHQConfig if hq else SamConfig
    return cls(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder), size


def _make_sam(path: str | Path, hq: bool, full_size: bool, seed: int) -> Path:
    from transformers import SamHQModel, SamHQProcessor, SamImageProcessor, SamModel, SamProcessor

    path = Path(path)
    torch.manual_seed(seed)
    config, size = _sam_configs(hq, full_size)
    model = (SamHQModel if hq else SamModel)(config).eval()
    image_processor = SamImageProcessor(size={"longest_edge": size}, pad_size={"height": size, "width": size},
                                        mask_size={"longest_edge": size // 4},
                                        mask_pad_size={"height": size // 4, "width": size // 4})
    model.save_pretrained(path)
    (SamHQProcessor if hq else SamProcessor)(image_processor=image_processor).save_pretrained(path)
    return path


def make_sam_hq(path: str | Path, full_size: bool = False, seed: int = 0) -> Path:
    """SAM-HQ (SamHQModel) with its processor; 64 px input when tiny, 1024 px when full size."""
    return _make_sam(path, True, full_size, seed)


def make_sam(path: str | Path, full_size: bool = False, seed: int = 0) -> Path:
    """Plain SAM (SamModel) with its processor."""
    return _make_sam(path, False, full_size, seed)


def _sharpen(class_head: torch.nn.Linear, mask_head: torch.nn.Module) -> None:
    """Scale a random universal-segmentation head so that queries prefer different classes and masks vary
    in space: the tiny random maps then hold several classes (the padding tests need spatial structure)."""
    last = [m for m in mask_head.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        class_head.weight.mul_(10.0)
        last.weight.mul_(100.0)


def make_mask2former(path: str | Path, num_labels: int = 133, full_size: bool = False, seed: int = 0) -> Path:
    """Mask2Former (Swin backbone) with ``num_labels`` classes (COCO-panoptic names when 133)."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor

    path = Path(path)
    torch.manual_seed(seed)
    if full_size:
        config = Mask2FormerConfig(**_labels(num_labels))
        image_processor = Mask2FormerImageProcessor(size={"shortest_edge": 384, "longest_edge": 1333},
                                                    size_divisor=32)
    else:
        config = Mask2FormerConfig(
            backbone_config=_swin(64, 16, [1, 1, 2, 2], out_features=["stage1", "stage2", "stage3", "stage4"]),
            feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=64, encoder_layers=1,
            decoder_layers=2, num_attention_heads=2, dim_feedforward=64, num_queries=12, **_labels(num_labels))
        image_processor = Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 128},
                                                    size_divisor=32)
    model = Mask2FormerForUniversalSegmentation(config).eval()
    if not full_size:
        _sharpen(model.class_predictor, model.model.transformer_module.decoder.mask_predictor.mask_embedder)
    model.save_pretrained(path)
    image_processor.save_pretrained(path)
    return path


def _clip_tokenizer():
    """A byte-level BPE (CLIP) tokenizer with the letters and the words of OneFormer's task prompts."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges = []
    for word in ["the", "task", "is", "semantic", "instance", "panoptic", "photo", "an", "a"]:
        current = word[0]
        for k, ch in enumerate(word[1:], start=1):
            piece = ch + ("</w>" if k == len(word) - 1 else "")
            merges.append((current, piece))
            current = current + piece
            vocab.setdefault(current, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=list(dict.fromkeys(merges)))


def make_oneformer(path: str | Path, num_labels: int = 133, full_size: bool = False, seed: int = 0) -> Path:
    """OneFormer (Swin backbone, CLIP-style task tokenizer) with ``num_labels`` classes."""
    from transformers import (OneFormerConfig, OneFormerForUniversalSegmentation, OneFormerImageProcessor,
                              OneFormerProcessor)

    path = Path(path)
    torch.manual_seed(seed)
    tokenizer = _clip_tokenizer()
    if full_size:
        config = OneFormerConfig(text_encoder_vocab_size=len(tokenizer), **_labels(num_labels))
        image_processor = OneFormerImageProcessor(size={"shortest_edge": 512, "longest_edge": 2048})
    else:
        config = OneFormerConfig(
            backbone_config=_swin(64, 16, [1, 1, 2, 2], out_features=["stage1", "stage2", "stage3", "stage4"]),
            num_queries=12, task_seq_len=16, text_encoder_width=32, text_encoder_context_length=16,
            text_encoder_num_layers=1, text_encoder_vocab_size=len(tokenizer), text_encoder_proj_layers=1,
            text_encoder_n_ctx=2, conv_dim=32, mask_dim=32, hidden_dim=32, encoder_feedforward_dim=64,
            encoder_layers=1, decoder_layers=2, num_attention_heads=2, dim_feedforward=64, query_dec_layers=1,
            **_labels(num_labels))
        image_processor = OneFormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 128})
    model = OneFormerForUniversalSegmentation(config).eval()
    if not full_size:
        decoder = model.model.transformer_module.decoder
        _sharpen(decoder.class_embed, decoder.mask_embed)
    model.save_pretrained(path)
    OneFormerProcessor(image_processor=image_processor, tokenizer=tokenizer,
                       max_seq_length=config.text_encoder_context_length,
                       task_seq_length=config.task_seq_len).save_pretrained(path)
    return path


def make_dpt_depth(path: str | Path, full_size: bool = False, seed: int = 0) -> Path:
    """A DPT depth model (transformers' AutoModelForDepthEstimation) with its image processor; 64 px input
    when tiny, DPTConfig()'s sizes (a ViT-B/16 backbone) at 384 px when full size."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    torch.manual_seed(seed)
    path = Path(path)
    if full_size:
        config, size = DPTConfig(), 384
    else:
        config, size = DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                                 image_size=64, patch_size=16, backbone_out_indices=[0, 1, 2, 3],
                                 neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16,
                                 reassemble_factors=[4, 2, 1, 0.5], head_in_index=-1), 64
    DPTForDepthEstimation(config).eval().save_pretrained(path)
    DPTImageProcessor(size={"height": size, "width": size}, keep_aspect_ratio=False).save_pretrained(path)
    return path
