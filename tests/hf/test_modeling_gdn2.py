"""The transformers GDN-2 model on its own: cache vs recomputation, padding, kernel vs plain PyTorch
recurrence, Auto-class registration. Inputs are UTF-8 bytes of WikiText (a 256-token vocabulary)."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from megatron_gdn2.hf import GDN2Config, GDN2ForCausalLM, modeling_gdn2, register_auto_classes
from tests.shared_data import SHARED_DATA

WIKITEXT = SHARED_DATA / "eval" / "wikitext2_raw_test.lf.txt"
HYBRID = ["linear_attention", "sliding_attention"] * 2
RECURRENT = ["linear_attention"] * 3


def make_model(layer_types, seed=0, **overrides):
    settings = dict(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=len(layer_types),
        layer_types=layer_types, num_heads=2, num_v_heads=4, head_k_dim=8, head_v_dim=8,
        allow_neg_eigval=True, num_attention_heads=4, num_key_value_heads=2, attention_head_dim=8,
        sliding_window=8, rotary_dim=4, pad_token_id=0, eos_token_id=None,
    )
    settings.update(overrides)
    torch.manual_seed(seed)
    model = GDN2ForCausalLM(GDN2Config(**settings)).eval()
    # Random gates: the stock init leaves biases at zero, which would hide a wrong bias path.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    return model


def text_bytes(n, offset=0, batch=1):
    data = WIKITEXT.read_bytes()[offset:offset + n * batch]
    return torch.tensor(list(data), dtype=torch.long).view(batch, n)


def set_kernels(model, enabled):
    for module in model.modules():
        if isinstance(module, modeling_gdn2.GatedDeltaNet2):
            module.use_gdn2_kernels = enabled


def cache_of(outputs):
    return getattr(outputs, modeling_gdn2.CACHE_FIELD)


@pytest.mark.parametrize("layer_types", [RECURRENT, HYBRID], ids=["recurrent", "hybrid"])
def test_cached_steps_match_full_forward(layer_types):
    model = make_model(layer_types)
    ids = text_bytes(30, batch=2)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        # A 13-token prefill, a 5-token chunk on top of the cache, then one token at a time.
        out = model(ids[:, :13], use_cache=True)
        pieces = [out.logits]
        out = model(ids[:, 13:18], cache=cache_of(out), use_cache=True)
        pieces.append(out.logits)
        cache = cache_of(out)
        for t in range(18, 30):
            pieces.append(model(ids[:, t:t + 1], cache=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=2e-5, rtol=0)
    assert cache.get_seq_length() == 30


def test_greedy_generation_with_cache_equals_recomputation_beyond_the_window():
    model = make_model(HYBRID)
    prompt = text_bytes(24, offset=1000)  # the window is 8 tokens: the context exceeds it from the start
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=64, do_sample=False, use_cache=True)
        recomputed = model.generate(prompt, max_new_tokens=64, do_sample=False, use_cache=False)
    assert cached.shape == (1, 24 + 64)
    assert torch.equal(cached, recomputed)


def test_cache_size_does_not_grow_with_context():
    model = make_model(HYBRID)
    config = model.config
    ids = text_bytes(60, offset=5000)
    sizes = []
    with torch.no_grad():
        cache = cache_of(model(ids[:, :10], use_cache=True))
        for t in range(10, 60):
            model(ids[:, t:t + 1], cache=cache, use_cache=True)
            sizes.append(cache.numel())
    assert len(set(sizes)) == 1
    for i, kind in enumerate(config.layer_types):
        if kind == "sliding_attention":
            assert cache.keys[i].shape == (1, config.num_key_value_heads, config.sliding_window - 1,
                                           config.attention_head_dim)
        else:
            assert cache.recurrent_states[i].shape == (1, config.num_v_heads, config.head_k_dim,
                                                       config.head_v_dim)
            assert all(t.shape[-1] == config.conv_size - 1 for t in cache.conv_states[i])


@pytest.mark.parametrize("layer_types", [RECURRENT, HYBRID], ids=["recurrent", "hybrid"])
def test_left_padding_matches_unpadded_sequences(layer_types):
    model = make_model(layer_types)
    long, short = text_bytes(15, offset=300), text_bytes(6, offset=700)
    batch = torch.zeros(2, 15, dtype=torch.long)
    batch[0], batch[1, 9:] = long[0], short[0]
    mask = torch.ones_like(batch)
    mask[1, :9] = 0
    with torch.no_grad():
        padded = model(batch, attention_mask=mask, use_cache=False).logits
        alone_long = model(long, use_cache=False).logits
        alone_short = model(short, use_cache=False).logits
    torch.testing.assert_close(padded[0], alone_long[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(padded[1, 9:], alone_short[0], atol=1e-5, rtol=0)
    assert torch.isfinite(padded).all()

    generated = model.generate(batch, attention_mask=mask, max_new_tokens=20, do_sample=False)
    assert torch.equal(generated[0, 15:], model.generate(long, max_new_tokens=20, do_sample=False)[0, 15:])
    assert torch.equal(generated[1, 15:], model.generate(short, max_new_tokens=20, do_sample=False)[0, 6:])


def test_gdn2_kernels_path_equals_plain_pytorch_recurrence():
    assert modeling_gdn2.kernels_available(), "gdn2_kernels must be importable where the tests run"
    model = make_model(HYBRID)
    ids = text_bytes(40, offset=2000, batch=2)
    results = {}
    for enabled in (True, False):
        set_kernels(model, enabled)
        with torch.no_grad():
            full = model(ids, use_cache=False).logits
            out = model(ids[:, :30], use_cache=True)
            cache = cache_of(out)
            steps = [model(ids[:, t:t + 1], cache=cache, use_cache=True).logits for t in range(30, 40)]
        results[enabled] = (full, torch.cat(steps, 1))
    torch.testing.assert_close(results[True][0], results[False][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(results[True][1], results[False][1], atol=1e-5, rtol=0)


def test_gdn2_kernels_are_called(monkeypatch):
    calls = []
    for name in ("chunk_gdn2", "fused_recurrent_gdn2"):
        original = getattr(modeling_gdn2, name)
        monkeypatch.setattr(modeling_gdn2, name,
                            lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    model = make_model(RECURRENT)
    model.generate(text_bytes(10), max_new_tokens=3, do_sample=False)
    layers = len(RECURRENT)
    assert calls == ["chunk_gdn2"] * layers + ["fused_recurrent_gdn2"] * layers * 2


def test_beam_search_with_cache_equals_recomputation():
    model = make_model(HYBRID)
    prompt = text_bytes(12, offset=4000)
    kwargs = dict(max_new_tokens=10, num_beams=3, do_sample=False, early_stopping=False)
    with torch.no_grad():
        assert torch.equal(model.generate(prompt, use_cache=True, **kwargs),
                           model.generate(prompt, use_cache=False, **kwargs))


def test_registered_auto_classes_round_trip(tmp_path):
    register_auto_classes()
    register_auto_classes()  # idempotent
    model = make_model(HYBRID)
    model.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), GDN2Config)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, GDN2ForCausalLM)
    ids = text_bytes(20)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    labels = ids.clone()
    loss = loaded(ids, labels=labels).loss
    expected = torch.nn.functional.cross_entropy(loaded(ids).logits[0, :-1], ids[0, 1:])
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("overrides, message", [
    (dict(layer_types=["linear_attention", "mamba"]), "unknown layer type"),
    (dict(layer_types=["linear_attention"], num_hidden_layers=2), "num_hidden_layers"),
    (dict(num_heads=3, num_v_heads=4), "num_v_heads"),
    (dict(num_attention_heads=4, num_key_value_heads=3), "num_key_value_heads"),
])
def test_bad_config_names_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        GDN2Config(**overrides)


def test_bad_attention_mask_names_the_argument():
    model = make_model(RECURRENT)
    with pytest.raises(ValueError, match="attention_mask"):
        model(text_bytes(5), attention_mask=torch.ones(1, 3))


@pytest.mark.gpu
def test_triton_kernels_on_gpu_match_the_cpu_model():
    """Prefill (chunk kernel) and decoding (recurrent kernel) on the GPU against the CPU model; the
    Triton kernels may use TF32 dots for fp32 inputs, hence the tolerance."""
    model = make_model(HYBRID)
    ids = text_bytes(80, offset=3000, batch=2)
    with torch.no_grad():
        expected = model(ids).logits
        gpu = model.cuda()
        logits = gpu(ids.cuda()).logits.cpu()
        out = gpu(ids[:, :60].cuda(), use_cache=True)
        cache = cache_of(out)
        steps = [gpu(ids[:, t:t + 1].cuda(), cache=cache, use_cache=True).logits.cpu() for t in range(60, 80)]
    torch.testing.assert_close(logits, expected, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(torch.cat(steps, 1), expected[:, 60:], atol=2e-3, rtol=2e-3)
