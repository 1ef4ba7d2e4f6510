"""saekit.lm: loading, hook names, both capture backends agreeing per family, early stop, splice.

Every model is either the built-in MiniLM or a tiny random one saved to tmp_path: nothing touches
the hub. Tiny models go through ``load_lm(str(path))``, the same path a user's model id takes.
"""
import json

import pytest
import torch
import transformers as T
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from saekit.lm import (
    LAYOUTS,
    UnknownHookError,
    UnsupportedArchitectureError,
    load_lm,
    make_capture,
    splice,
    unembedding,
    valid_hook_names,
)
from saekit.lm.hooks import blocks_of, hook_name, mlp_hooks
from saekit.lm.loading import resolve_source

VOCAB = 96
KINDS = ("resid_pre", "attn_out", "mlp_in", "mlp_out", "resid_post")
_SHAPE = dict(
    vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
    intermediate_size=128, max_position_embeddings=64, bos_token_id=2, eos_token_id=3, pad_token_id=0,
)
_GQA = dict(_SHAPE, num_key_value_heads=2)


def _tiny_model(family: str):
    if family == "gpt2":
        cfg = T.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64,
                           bos_token_id=2, eos_token_id=3, pad_token_id=0)
        return T.GPT2LMHeadModel(cfg)
    if family == "gpt_neox":
        return T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**_SHAPE))
    if family == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(**_GQA))
    if family == "qwen2":
        return T.Qwen2ForCausalLM(T.Qwen2Config(**_GQA))
    if family == "gemma2":
        return T.Gemma2ForCausalLM(T.Gemma2Config(**_GQA, head_dim=16, sliding_window=16))
    if family == "bert":
        return T.BertModel(T.BertConfig(**_SHAPE))
    raise AssertionError(family)


def _tiny_tokenizer():
    specials = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    vocab.update({f"w{i}": i for i in range(len(specials), VOCAB)})
    inner = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=inner, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
        eos_token="[EOS]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
    )


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_lms")
    tokenizer = _tiny_tokenizer()
    paths = {}
    for family in LAYOUTS:
        torch.manual_seed(0)
        path = root / family
        _tiny_model(family).save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths[family] = path
    return paths


@pytest.fixture(scope="module")
def minilm():
    return load_lm("all-MiniLM-L6-v2")


def _batch():
    """Three rows: unpadded, right-padded, left-padded."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(7, VOCAB, (3, 10), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, :3] = 0
    ids[mask == 0] = 0
    return ids, mask


def _capture(lm, hooks, backend, ids, mask):
    with make_capture(lm, hooks, backend=backend) as capture:
        return capture(ids, mask)


def _assert_agree(lm, hooks, ids, mask, atol, rtol=0.0):
    hf = _capture(lm, hooks, "hf", ids, mask)
    tl = _capture(lm, hooks, "transformer_lens", ids, mask)
    real = mask.bool()  # padded positions carry no meaning (and differ between sdpa and eager)
    for hook in hooks:
        assert hf[hook].shape == (*ids.shape, lm.d_model), hook
        torch.testing.assert_close(hf[hook][real], tl[hook][real], atol=atol, rtol=rtol, msg=hook)
    return hf


# ------------------------------------------------------------------------------- loading
@pytest.mark.parametrize("family", list(LAYOUTS))
def test_backends_agree_for_every_family(tiny_dirs, family):
    lm = load_lm(str(tiny_dirs[family]))
    assert (lm.architecture, lm.d_model, lm.n_layers, lm.n_ctx) == (family, 64, 2, 64)
    assert lm.is_causal == (family != "bert")
    assert not lm.model.training
    hooks = [hook_name(layer, kind) for layer in (0, lm.n_layers - 1) for kind in KINDS]
    ids, mask = _batch()
    before = _assert_agree(lm, hooks, ids, mask, atol=1e-5)
    # Booting the bridge must leave lm.model a plain HF model: the hf backend gives the same bits.
    after = _capture(lm, hooks, "hf", ids, mask)
    for hook in hooks:
        torch.testing.assert_close(after[hook], before[hook], atol=0, rtol=0)


def test_builtin_minilm_agrees_across_backends(minilm):
    assert (minilm.architecture, minilm.d_model, minilm.n_layers) == ("bert", 384, 6)
    assert minilm.source_path is not None and not minilm.is_causal
    batch = minilm.tokenizer(["The cat sat on the mat.", "Hi"], padding=True, return_tensors="pt")
    hooks = ["blocks.1.hook_resid_post", "blocks.3.hook_mlp_out", "blocks.5.hook_attn_out"]
    # MiniLM's activations reach ~50, and the bridge runs eager attention where HF runs sdpa.
    _assert_agree(minilm, hooks, batch.input_ids, batch.attention_mask, atol=1e-4, rtol=1e-5)


def test_builtin_names_resolve_offline():
    path, local = resolve_source("all-MiniLM-L6-v2")
    assert local and resolve_source("sentence-transformers/all-MiniLM-L6-v2") == (path, True)
    assert resolve_source("EleutherAI/pythia-70m") == ("EleutherAI/pythia-70m", False)


def test_unsupported_architecture_names_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "opt"}))
    with pytest.raises(UnsupportedArchitectureError, match="gpt_neox.*gemma2"):
        load_lm(str(tmp_path))


def test_dtype_is_kept(tiny_dirs):
    lm = load_lm(str(tiny_dirs["llama"]), dtype="bfloat16")
    assert lm.dtype == torch.bfloat16
    ids, mask = _batch()
    acts = _capture(lm, ["blocks.0.hook_mlp_out"], "hf", ids, mask)
    assert acts["blocks.0.hook_mlp_out"].dtype == torch.bfloat16


def test_unembedding(tiny_dirs, minilm):
    lm = load_lm(str(tiny_dirs["gpt2"]))
    W_U = unembedding(lm)
    assert W_U.shape == (64, VOCAB)
    torch.testing.assert_close(W_U, lm.model.lm_head.weight.T)
    assert unembedding(minilm) is None


# ---------------------------------------------------------------------------------- hooks
def test_unknown_hook_lists_valid_names(minilm):
    valid = valid_hook_names(minilm)
    assert len(valid) == 5 * 6 and "blocks.3.hook_resid_post" in valid and "blocks.3.mlp.hook_in" in valid
    for bad in ["blocks.3.hook_resid_postt", "blocks.6.hook_resid_pre", "hook_embed"]:
        for backend in ("hf", "transformer_lens"):
            with pytest.raises(UnknownHookError) as err:
                make_capture(minilm, [bad], backend=backend)
            assert bad in str(err.value) and "blocks.5.hook_mlp_out" in str(err.value)
            assert isinstance(err.value, ValueError)
    with pytest.raises(ValueError, match="backend"):
        make_capture(minilm, valid[:1], backend="nnsight")


def _mlp(lm, layer):
    """The block's MLP as the function from what mlp.hook_in captures to what hook_mlp_out captures."""
    block = blocks_of(lm)[layer]
    if lm.architecture == "bert":
        return lambda h: block.output.dense(block.intermediate(h))
    if lm.architecture == "gemma2":
        return lambda h: block.post_feedforward_layernorm(block.mlp(h))
    return block.mlp


@pytest.mark.parametrize("family", list(LAYOUTS))
def test_mlp_hooks_are_the_mlps_input_and_output(tiny_dirs, family):
    """mlp.hook_in is exactly what the HF MLP module receives, and hook_mlp_out is that module's
    function of it: the pair a transcoder maps."""
    lm = load_lm(str(tiny_dirs[family]))
    mlp_in, mlp_out = mlp_hooks(1)
    ids, mask = _batch()
    block = blocks_of(lm)[1]
    module = block.intermediate if family == "bert" else block.mlp
    seen = []
    handle = module.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    try:
        acts = _capture(lm, [mlp_in, mlp_out], "hf", ids, mask)
    finally:
        handle.remove()
    assert torch.equal(acts[mlp_in], seen[0])
    with torch.inference_mode():
        torch.testing.assert_close(_mlp(lm, 1)(acts[mlp_in]), acts[mlp_out], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(acts[mlp_in], acts[mlp_out])


def test_hf_backend_stops_after_deepest_hook(tiny_dirs):
    lm = load_lm(str(tiny_dirs["gpt2"]))
    calls = []
    later = [
        blocks_of(lm)[0].mlp.register_forward_hook(lambda *a: calls.append("mlp0")),
        blocks_of(lm)[1].register_forward_hook(lambda *a: calls.append("block1")),
        lm.model.lm_head.register_forward_hook(lambda *a: calls.append("lm_head")),
    ]
    ids, mask = _batch()
    with make_capture(lm, ["blocks.0.hook_attn_out", "blocks.0.hook_resid_pre"]) as capture:
        acts = capture(ids, mask)
    assert set(acts) == {"blocks.0.hook_attn_out", "blocks.0.hook_resid_pre"}
    assert calls == []  # nothing past layer 0's attention ran
    with make_capture(lm, ["blocks.1.hook_resid_post"]) as capture:
        capture(ids, mask)
    assert calls == ["mlp0", "block1"]  # the last block ran, the LM head did not
    for handle in later:
        handle.remove()


def test_closed_and_leaked_captures(tiny_dirs):
    lm = load_lm(str(tiny_dirs["qwen2"]))
    ids, mask = _batch()
    leaked = make_capture(lm, ["blocks.0.hook_resid_post"])  # never closed
    leaked(ids, mask)
    # A leaked capture's hooks stay inert: they neither stop nor pollute another capture.
    with make_capture(lm, ["blocks.1.hook_resid_post", "blocks.0.hook_resid_post"]) as capture:
        acts = capture(ids, mask)
    assert list(acts) == ["blocks.1.hook_resid_post", "blocks.0.hook_resid_post"]
    leaked.close()
    with pytest.raises(RuntimeError, match="closed"):
        leaked(ids, mask)


# --------------------------------------------------------------------------------- splice
def _output(lm, ids, mask):
    with torch.inference_mode():
        out = lm.model(input_ids=ids, attention_mask=mask)
    return out.logits if lm.is_causal else out.last_hidden_state


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("backend", ["hf", "transformer_lens"])
def test_splice_identity_and_zeros(tiny_dirs, family, backend):
    lm = load_lm(str(tiny_dirs[family]))
    ids, mask = _batch()
    real = mask.bool()
    clean = _output(lm, ids, mask)
    hook = "blocks.0.hook_mlp_out"
    with splice(lm, hook, lambda act: act, backend=backend):
        same = _output(lm, ids, mask)
    torch.testing.assert_close(same[real], clean[real], atol=1e-5, rtol=0)
    with splice(lm, hook, torch.zeros_like, backend=backend):
        zeroed = _output(lm, ids, mask)
    assert (zeroed[real] - clean[real]).abs().max() > 1e-3
    # Leaving the context restores the plain model exactly.
    torch.testing.assert_close(_output(lm, ids, mask), clean, atol=0, rtol=0)
    assert "forward" not in vars(lm.model)


def test_splice_backends_agree_and_check_shape(tiny_dirs):
    lm = load_lm(str(tiny_dirs["gemma2"]))
    ids, mask = _batch()
    real = mask.bool()
    outs = {}
    for backend in ("hf", "transformer_lens"):
        with splice(lm, "blocks.1.hook_resid_pre", lambda act: 0.5 * act, backend=backend):
            outs[backend] = _output(lm, ids, mask)
    torch.testing.assert_close(outs["hf"][real], outs["transformer_lens"][real], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="must return shape"):
        with splice(lm, "blocks.0.hook_attn_out", lambda act: act[:, :1]):
            _output(lm, ids, mask)
