"""A Hugging Face ``config.json`` held against its weight file's header before any array
exists (docs/pretrained.md#from-pretrained; host-side I/O).

``from_pretrained`` builds a model from the config and then reads the tensors: a config that
lies (``num_hidden_layers`` 10⁶, ``vocab_size`` 2⁴⁰, a plausible wrong ``hidden_size``) would
make the build allocate gigabytes before a shape is compared. So, first:

1. every size field is range-checked (type and bounds; a float, a bool or 10¹² is refused by
   name);
2. the safetensors headers alone are read (bounded; no tensor data) and every tensor the
   config implies is looked up there: a missing key, a layer count that differs, or a shape
   that differs is one ``ValueError`` naming the config file, the field and the weight file.

Once this passes, the model's parameters are exactly the header's tensors, so what the build
and the read allocate is bounded by the files' sizes.
"""
from __future__ import annotations

import re
from pathlib import Path

from .. import models
from ..files.schema import check, int_in
from ..files.storage import read_json
from ..files.untrusted import parse_safetensors_header, read_head, regular_file

MAX_VOCAB = 1 << 22          # the largest released vocabularies hold about 2**18 tokens
MAX_POSITIONS = 1 << 20
MAX_WIDTH = 1 << 16
MAX_LAYERS = 1024
_OPTIONAL_INT = {"n_inner": (1, 1 << 18), "pad_token_id": (0, MAX_VOCAB)}


def _int_or_null(low, high):
    test = int_in(low, high)
    return lambda v: None if v is None else test(v)


def _flag(v):
    if not isinstance(v, bool):
        return f"must be true or false, got {v!r}"


def _eps(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
        return f"must be a number in (0, 1], got {v!r}"


FIELDS = {
    "gpt2": {"vocab_size?": int_in(1, MAX_VOCAB), "n_positions?": int_in(1, MAX_POSITIONS),
             "n_layer?": int_in(1, MAX_LAYERS), "n_head?": int_in(1, MAX_WIDTH),
             "n_embd?": int_in(1, MAX_WIDTH), "n_inner?": _int_or_null(*_OPTIONAL_INT["n_inner"]),
             "tie_word_embeddings?": _flag, "layer_norm_epsilon?": _eps},
    "bert": {"vocab_size?": int_in(1, MAX_VOCAB), "hidden_size?": int_in(1, MAX_WIDTH),
             "num_hidden_layers?": int_in(1, MAX_LAYERS),
             "num_attention_heads?": int_in(1, MAX_WIDTH),
             "intermediate_size?": int_in(1, 1 << 18),
             "max_position_embeddings?": int_in(1, MAX_POSITIONS),
             "type_vocab_size?": int_in(1, MAX_WIDTH),
             "pad_token_id?": _int_or_null(*_OPTIONAL_INT["pad_token_id"]),
             "layer_norm_eps?": _eps},
}


def check_config_against_headers(directory, hf_config: dict, entry, config_path) -> None:
    """Refuse ``hf_config`` (read from ``config_path``) unless its sizes are in range and every
    tensor it implies is in the weight headers of ``directory`` with the implied shape."""
    where = str(config_path)
    check(hf_config, FIELDS.get(entry.name, {}), where)
    found = header_shapes(Path(directory))
    if found is None:
        return   # a weight file is missing: the loader names it before anything is built
    shapes, files = found
    shapes = {_strip(k, entry): v for k, v in shapes.items()}
    files = {_strip(k, entry): v for k, v in files.items()}
    try:
        config = entry.config_from_hf(hf_config, set(shapes), where)
    except (ValueError, TypeError, OverflowError) as exc:   # a config class's own check
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(text if where in text else f"{where}: {text}") from None
    expected = EXPECTED.get(entry.name)
    if expected is None:
        return
    fields, layers, wanted = expected(config)
    field, count, pattern = layers
    held = {int(m.group(1)) for k in shapes if (m := re.match(pattern, k))}
    if held and max(held) + 1 != count:
        raise ValueError(f"{where}: field {field!r} = {count}, but the weight file "
                         f"{_one(files)} holds {max(held) + 1} layers")
    for key, dims in wanted:
        if key not in shapes:
            raise ValueError(f"missing key {key!r} in {_one(files)}: the model {where} "
                             "describes needs it")
        want = tuple(fields[f] * k for f, k in dims)
        if shapes[key] != want:
            bad = next((f for (f, k), got in zip(dims, shapes[key]) if fields[f] * k != got),
                       dims[0][0]) if len(want) == len(shapes[key]) else dims[0][0]
            raise ValueError(f"shape mismatch for key {key!r} in {files[key]}: it holds "
                             f"{shapes[key]}, {where} field {bad!r} = {fields[bad]} implies "
                             f"{want}")


def _one(files: dict) -> str:
    names = sorted({str(f) for f in files.values()})
    return names[0] if len(names) == 1 else f"{names[0]} (and {len(names) - 1} more shards)"


def _strip(key: str, entry) -> str:
    name = key[len(entry.prefix):] if entry.prefix and key.startswith(entry.prefix) else key
    return models.hf.rename_legacy(name)


def header_shapes(directory: Path) -> tuple[dict, dict] | None:
    """``({key: shape}, {key: file})`` from the safetensors headers of ``model.safetensors``
    or of every shard ``model.safetensors.index.json`` lists (``None`` if one is missing); no
    tensor data is read."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no 'weight_map' object")
        shards = set(weight_map.values())
        bad = [s for s in shards
               if not isinstance(s, str) or Path(s).name != s or s in ("", ".", "..")]
        if bad:
            raise ValueError(f"{index}: field 'weight_map' names shard {bad[0]!r}, which is not "
                             "a file name in the model's directory")
        paths = [directory / s for s in sorted(shards)]
    else:
        paths = [directory / "model.safetensors"]
    shapes, files = {}, {}
    for path in paths:
        if not path.is_file():
            return None
        for key, (_, shape, _) in read_header(path).items():
            shapes[key], files[key] = shape, path
    return shapes, files


def read_header(path: Path) -> dict:
    """``{key: (dtype, shape, offsets)}`` of a safetensors file, from its bounded header."""
    size = regular_file(path, 1 << 62, "safetensors file")
    return parse_safetensors_header(read_head(path, size), size, path)[0]


# --- the tensors a config implies: (HF field values, (layer field, count, key regex),
#     [(key, ((field, multiple), ...))]) --------------------------------------------------------

def _gpt2(c):
    f = {"vocab_size": c.vocab_size, "n_positions": c.context, "n_embd": c.d_model,
         "n_layer": c.n_layer}
    d = (("n_embd", 1),)
    wanted = [("wte.weight", (("vocab_size", 1),) + d), ("wpe.weight", (("n_positions", 1),) + d)]
    for i in range(c.n_layer):
        h = f"h.{i}."
        wanted += [(h + "ln_1.weight", d), (h + "ln_1.bias", d), (h + "ln_2.weight", d),
                   (h + "ln_2.bias", d), (h + "attn.c_attn.weight", d + (("n_embd", 3),)),
                   (h + "attn.c_attn.bias", (("n_embd", 3),)), (h + "attn.c_proj.weight", d + d),
                   (h + "attn.c_proj.bias", d), (h + "mlp.c_fc.weight", d + (("n_embd", 4),)),
                   (h + "mlp.c_fc.bias", (("n_embd", 4),)),
                   (h + "mlp.c_proj.weight", (("n_embd", 4),) + d), (h + "mlp.c_proj.bias", d)]
    wanted += [("ln_f.weight", d), ("ln_f.bias", d)]
    if not c.tie_embeddings:
        wanted.append(("lm_head.weight", (("vocab_size", 1),) + d))
    return f, ("n_layer", c.n_layer, r"h\.(\d+)\."), wanted


def _bert(c):
    f = {"vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
         "max_position_embeddings": c.max_position_embeddings,
         "type_vocab_size": c.type_vocab_size, "intermediate_size": c.intermediate_size,
         "num_hidden_layers": c.num_hidden_layers}
    d, inner = (("hidden_size", 1),), (("intermediate_size", 1),)
    e = "embeddings."
    wanted = [(e + "word_embeddings.weight", (("vocab_size", 1),) + d),
              (e + "position_embeddings.weight", (("max_position_embeddings", 1),) + d),
              (e + "token_type_embeddings.weight", (("type_vocab_size", 1),) + d),
              (e + "LayerNorm.weight", d), (e + "LayerNorm.bias", d)]
    for i in range(c.num_hidden_layers):
        p = f"encoder.layer.{i}."
        for lin in ("attention.self.query", "attention.self.key", "attention.self.value",
                    "attention.output.dense"):
            wanted += [(f"{p}{lin}.weight", d + d), (f"{p}{lin}.bias", d)]
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            wanted += [(f"{p}{norm}.weight", d), (f"{p}{norm}.bias", d)]
        wanted += [(p + "intermediate.dense.weight", inner + d),
                   (p + "intermediate.dense.bias", inner),
                   (p + "output.dense.weight", d + inner), (p + "output.dense.bias", d)]
    if c.pooler:
        wanted += [("pooler.dense.weight", d + d), ("pooler.dense.bias", d)]
    return f, ("num_hidden_layers", c.num_hidden_layers, r"encoder\.layer\.(\d+)\."), wanted


EXPECTED = {"gpt2": _gpt2, "bert": _bert}
