"""Shared helpers for the evaluation, downstream and compare tests: tiny random GPT-2 and BERT models saved in
HF format, with real tokenizers (byte-level BPE; WordPiece with ``##`` pieces) built offline from a
synthetic corpus, and small stores harvested from them through ``saekit.harvest``.
"""
import random
from pathlib import Path

import torch
import transformers as T

from saekit.config import HarvestConfig
from saekit.harvest import harvest

WORDS = ["the", "a", "cat", "dog", "bird", "run", "jump", "play", "walk", "talk", "sit", "red", "blue",
         "green", "big", "small", "house", "tree", "river", "stone", "look", "open", "read", "call"]
SUFFIXES = ["ing", "ed", "s", "er"]
HOOK = "blocks.0.hook_resid_post"


def corpus(n_docs: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        words = [rng.choice(WORDS) + (rng.choice(SUFFIXES) if rng.random() < 0.3 else "")
                 for _ in range(rng.randint(5, 14))]
        docs.append(" ".join(words) + ".")
    return docs


def write_corpus(path: Path, n_docs: int = 400) -> Path:
    path.write_text("\n\n".join(corpus(n_docs)) + "\n")
    return path


def _gpt2_tokenizer():
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus(), vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False)
    return T.GPT2TokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                               unk_token="<|endoftext|>", model_max_length=64)


def _bert_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    # "hello world" too: saekit.data.tokens finds the wrapper specials by tokenizing it.
    pieces = WORDS + ["hello", "world"] + ["##" + s for s in SUFFIXES] + ["."]
    vocab = {t: i for i, t in enumerate(specials + pieces)}
    inner = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##"))
    inner.normalizer = normalizers.BertNormalizer(lowercase=True)
    inner.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    inner.post_processor = processors.BertProcessing(("[SEP]", vocab["[SEP]"]), ("[CLS]", vocab["[CLS]"]))
    return T.BertTokenizerFast(tokenizer_object=inner, pad_token="[PAD]", unk_token="[UNK]",
                               cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                               model_max_length=64)


def save_tiny(family: str, path: Path, seed: int = 0) -> Path:
    """A tiny random model of ``family`` ("gpt2" or "bert") with its tokenizer, saved to ``path``."""
    torch.manual_seed(seed)
    if family == "gpt2":
        tok = _gpt2_tokenizer()
        model = T.GPT2LMHeadModel(T.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=len(tok),
                                               n_positions=64, bos_token_id=tok.eos_token_id,
                                               eos_token_id=tok.eos_token_id))
    elif family == "bert":
        tok = _bert_tokenizer()
        model = T.BertModel(T.BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, intermediate_size=128,
                                         max_position_embeddings=64, pad_token_id=0))
    else:
        raise ValueError(family)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def harvest_store(model_dir: Path, out: Path, corpus_file: Path, max_tokens: int = 3000,
                  context_size: int = 32, hooks=(HOOK,)) -> Path:
    cfg = HarvestConfig(out=str(out), model=str(model_dir), hooks=list(hooks), dataset=str(corpus_file),
                        context_size=context_size, max_tokens=max_tokens, batch_sequences=8, shard_sequences=32,
                        device="cpu", progress=False)
    return harvest(cfg)


def load_train_check():
    """scripts/train_check.py (the toy model and resumable synthetic data) as the module ``train_check``,
    loaded once per process (its dataclasses need their module in sys.modules)."""
    import importlib.util
    import sys

    if "train_check" not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "scripts" / "train_check.py"
        spec = importlib.util.spec_from_file_location("train_check", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["train_check"] = module
        spec.loader.exec_module(module)
    return sys.modules["train_check"]
