"""GGUF files in: tensors read back bit for bit (every supported type), llama.cpp's q/k row
order undone, the config from the metadata, the model built, and bad files refused in one line
naming the field."""
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("gguf")
from gguf_writer import T, TINY, write_tiny_gguf  # noqa: E402

import lowrank as lr  # noqa: E402
from lowrank.files.gguf_file import open_gguf, permute_qk, unpermute_qk  # noqa: E402

EVERY_TYPE = {"token_embd.weight": T.Q8_0, "attn_q.weight": T.Q4_K, "attn_k.weight": T.Q5_K,
              "attn_v.weight": T.Q6_K, "attn_output.weight": T.Q4_0,
              "ffn_gate.weight": T.Q4_1, "ffn_up.weight": T.BF16, "ffn_down.weight": T.F16,
              "output.weight": T.F32}


@pytest.fixture(scope="module")
def every_type(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_tiny_gguf(path, types=EVERY_TYPE)


def test_every_supported_type_reads_back_bit_for_bit(every_type):
    import gguf
    path, written = every_type
    got = open_gguf(path)
    tensors = got.tensors()
    seen = set()
    for name, (qtype, data, hf) in written.items():
        expected = gguf.quants.dequantize(data, qtype).reshape(hf.shape)
        kind = name.split(".")[-2]
        if kind in ("attn_q", "attn_k"):
            expected = unpermute_qk(expected, TINY["heads" if kind == "attn_q" else "kv_heads"])
        array = tensors[got.names[name]]
        assert type(array) is np.ndarray and array.dtype == np.float32
        assert array.shape == hf.shape and array.flags.writeable   # not the mapped file
        assert np.array_equal(array, expected.astype(np.float32)), name
        seen.add(qtype.name)
    assert seen == {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"}


def test_f32_q_and_k_come_back_in_the_hugging_face_order(tmp_path):
    written = write_tiny_gguf(tmp_path / "f32.gguf")
    tensors = open_gguf(tmp_path / "f32.gguf").tensors()
    q = tensors["model.layers.1.self_attn.q_proj.weight"]
    k = tensors["model.layers.1.self_attn.k_proj.weight"]
    assert np.array_equal(q, written["blk.1.attn_q.weight"][2].astype(np.float32))
    assert np.array_equal(k, written["blk.1.attn_k.weight"][2].astype(np.float32))
    assert not np.array_equal(q, written["blk.1.attn_q.weight"][1])   # the file's own order


def _rope_rotate_half(x, pos, theta=10000.0):
    """transformers' RoPE on ``x (..., d)``: pairs (i, i + d/2)."""
    d = x.shape[-1]
    inv = theta ** (-np.arange(0, d, 2) / d)
    ang = np.concatenate([pos * inv, pos * inv])
    rot = np.concatenate([-x[..., d // 2:], x[..., :d // 2]], axis=-1)
    return x * np.cos(ang) + rot * np.sin(ang)


def _rope_interleaved(x, pos, theta=10000.0):
    """llama.cpp's RoPE for ``llama``: pairs (2i, 2i + 1)."""
    d = x.shape[-1]
    ang = pos * theta ** (-np.arange(0, d, 2) / d)
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = a * np.cos(ang) - b * np.sin(ang)
    out[..., 1::2] = a * np.sin(ang) + b * np.cos(ang)
    return out


@pytest.mark.parametrize("n_head,head_dim", [(1, 2), (3, 8), (4, 64)])
def test_permutation_round_trip_and_what_it_is_for(n_head, head_dim):
    rng = np.random.default_rng(n_head)
    w = rng.standard_normal((n_head * head_dim, 5))
    assert np.array_equal(unpermute_qk(permute_qk(w, n_head), n_head), w)
    assert np.array_equal(permute_qk(unpermute_qk(w, n_head), n_head), w)
    b = rng.standard_normal(n_head * head_dim)   # biases permute as rows too
    assert np.array_equal(unpermute_qk(permute_qk(b, n_head), n_head), b)
    # llama.cpp's interleaved RoPE on the permuted rows == transformers' on the original ones
    x = rng.standard_normal(5)
    for pos in (0, 1, 7):
        hf = _rope_rotate_half((w @ x).reshape(n_head, head_dim), pos)
        cpp = _rope_interleaved((permute_qk(w, n_head) @ x).reshape(n_head, head_dim), pos)
        np.testing.assert_allclose(permute_qk(hf.reshape(-1), n_head), cpp.reshape(-1),
                                   rtol=1e-12, atol=1e-12)


def test_config_from_metadata(every_type):
    path, _ = every_type
    c = open_gguf(path).config
    assert c["model_type"] == "llama" and c["hidden_size"] == TINY["hidden"]
    assert c["num_key_value_heads"] == TINY["kv_heads"] and c["head_dim"] == 64
    assert c["tie_word_embeddings"] is False and c["vocab_size"] == TINY["vocab"]
    assert (c["bos_token_id"], c["eos_token_id"], c["pad_token_id"]) == (1, 2, 2)


def test_matches_transformers_reading_the_same_file(every_type):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path, _ = every_type
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32)
    ours = open_gguf(path).tensors()
    theirs = {k: v.numpy() for k, v in hf.state_dict().items()}
    assert set(ours) == set(theirs)
    for key, array in ours.items():
        assert np.array_equal(array, theirs[key]), key


@pytest.mark.parametrize("tied", [False, True])
def test_model_from_gguf_gives_transformers_logits(tmp_path, tied):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, types={"attn_q.weight": T.Q8_0, "ffn_up.weight": T.Q4_1},
                    tied=tied)
    model = lr.from_pretrained(path)   # float32: transformers computes GGUF blocks in float32
    assert model.config.tie_word_embeddings is tied
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32)
    ids = np.random.default_rng(0).integers(0, TINY["vocab"], size=(2, 9))
    ours, _ = model.forward(ids)
    with torch.no_grad():
        theirs = hf(torch.tensor(ids)).logits.numpy()
    assert np.abs(np.asarray(ours) - theirs).max() / np.abs(theirs).max() < 1e-5


def test_qwen2_keeps_the_file_order_and_its_biases(tmp_path):
    written = write_tiny_gguf(tmp_path / "q.gguf", arch="qwen2")
    got = open_gguf(tmp_path / "q.gguf")
    assert got.config["model_type"] == "qwen2"
    tensors = got.tensors()
    assert np.array_equal(tensors["model.layers.0.self_attn.q_proj.weight"],
                          written["blk.0.attn_q.weight"][1].astype(np.float32))
    assert "model.layers.0.self_attn.k_proj.bias" in tensors


def test_mistral_by_its_name(tmp_path):
    write_tiny_gguf(tmp_path / "m.gguf", name="Mistral 7B Instruct")
    c = open_gguf(tmp_path / "m.gguf").config
    assert c["model_type"] == "mistral" and c["sliding_window"] is None


# --- bad files: one line naming the field ---------------------------------------------------------
def _one_line_error(path, match):
    with pytest.raises(ValueError) as info:
        open_gguf(path).tensors()
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert match in message, message
    return message


def test_unknown_architecture(tmp_path):
    write_tiny_gguf(tmp_path / "a.gguf", arch="gemma")
    _one_line_error(tmp_path / "a.gguf", "general.architecture 'gemma' is not supported")


def test_unsupported_tensor_type(tmp_path):
    write_tiny_gguf(tmp_path / "t.gguf", types={"ffn_down.weight": T.Q2_K})
    _one_line_error(tmp_path / "t.gguf", "tensor 'blk.0.ffn_down.weight' has type Q2_K")


def test_metadata_and_tensors_disagree(tmp_path):
    path = tmp_path / "d.gguf"
    write_tiny_gguf(path, meta={"ffn": 256})
    message = _one_line_error(path, "tensor 'blk.0.ffn_gate.weight' has shape (512, 256)")
    assert "llama.feed_forward_length=256" in message


def test_missing_field(tmp_path):
    write_tiny_gguf(tmp_path / "h.gguf", arch="qwen2", extra={})
    data = (tmp_path / "h.gguf").read_bytes().replace(b"qwen2.block_count", b"qwen2.blokk_count")
    (tmp_path / "h.gguf").write_bytes(data)
    _one_line_error(tmp_path / "h.gguf", "metadata field 'qwen2.block_count' is missing")


def test_truncated_file_and_not_a_gguf(tmp_path):
    path = tmp_path / "cut.gguf"
    write_tiny_gguf(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    _one_line_error(path, "")
    path.write_bytes(b"not a gguf file at all" * 10)
    _one_line_error(path, "not a readable GGUF file")


def test_tokenizer_without_merges(tmp_path):
    path = tmp_path / "nm.gguf"
    write_tiny_gguf(path, tokenizer={"tokenizer.ggml.merges": None})
    with pytest.raises(ValueError, match="'tokenizer.ggml.merges' is missing") as info:
        lr.Tokenizer.from_pretrained(path)
    assert "\n" not in str(info.value)


def test_cli_says_one_line(tmp_path):
    path = tmp_path / "a.gguf"
    write_tiny_gguf(path, arch="gemma")
    run = subprocess.run([sys.executable, "-m", "lowrank.app.cli", "generate", "--model", str(path),
                          "--chat", "hi"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "general.architecture 'gemma' is not supported" in lines[0]
