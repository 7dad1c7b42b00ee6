"""model/resolver.py: the one resolver of the model config and the job config (nesting, conversion by the fields'
resolved types, one-line errors naming the full key), and a recorded config.yaml resolving to its fingerprint."""
from __future__ import annotations

import dataclasses

import pytest
import yaml

from model import make_config
from model.resolver import nest, update_dataclass
from training.config import resolve_config


@dataclasses.dataclass
class Inner:
    k: int = 1
    std: float | None = None


@dataclasses.dataclass
class Outer:
    flag: bool = False
    name: str = "a"
    layers: tuple[int, ...] = (3,)
    pair: tuple[float, float] = (0.9, 0.95)
    files: list[str] = dataclasses.field(default_factory=list)
    extra: dict = dataclasses.field(default_factory=dict)
    inner: Inner = dataclasses.field(default_factory=Inner)


def test_values_become_their_fields_types():
    got = update_dataclass(Outer(), {"flag": "true", "name": 7, "layers": "1,2", "pair": [1, "0.5"],
                                     "files": "a.jsonl, b.jsonl", "inner.k": 4.0, "inner.std": "0.5"}, prefix="x.")
    assert got == Outer(flag=True, name="7", layers=(1, 2), pair=(1.0, 0.5), files=["a.jsonl", "b.jsonl"],
                        inner=Inner(k=4, std=0.5))
    assert type(got.inner.k) is int and type(got.pair[0]) is float
    assert update_dataclass(Outer(), {"layers": "[]", "inner": {"std": None}}, prefix="").layers == ()


@pytest.mark.parametrize("updates,message", [
    ({"inner.k": "x"}, "config key 'x.inner.k': 'x' has the wrong type: expected int"),
    ({"inner.k": 2.5}, "config key 'x.inner.k': 2.5 has the wrong type: expected int"),
    ({"inner.k": True}, "config key 'x.inner.k': True has the wrong type: expected int"),
    ({"inner.std": "wide"}, "config key 'x.inner.std': 'wide' has the wrong type: expected float | None"),
    ({"flag": "maybe"}, "config key 'x.flag': 'maybe' has the wrong type: expected bool"),
    ({"pair": (0.1, 0.2, 0.3)}, "config key 'x.pair': (0.1, 0.2, 0.3) has the wrong type: expected tuple[float, float]"),
    ({"layers": "1,x"}, "config key 'x.layers': '1,x' has the wrong type: expected tuple[int, ...]"),
    ({"extra": 3}, "config key 'x.extra': 3 has the wrong type: expected dict"),
    ({"inner": 3}, "config key 'x.inner' must be a mapping of its fields, got 3"),
    ({"inner.bogus": 1}, "unknown config key 'x.inner.bogus'; valid keys: k, std"),
])
def test_errors_are_one_line_naming_the_full_key(updates, message):
    with pytest.raises(ValueError) as err:
        update_dataclass(Outer(), updates, prefix="x.")
    assert str(err.value) == message


def test_nest_merges_mappings_and_refuses_a_value_under_keys():
    assert nest({"memory.k": 8, "memory": {"heads": 2}, "dim": 64}) == {"memory": {"k": 8, "heads": 2}, "dim": 64}
    assert nest({"m": {"a": {"b": 1}}, "m.a.c": 2}) == {"m": {"a": {"b": 1, "c": 2}}}
    assert nest({"memory": {"x.y": 1}}) == {"memory": {"x.y": 1}}          # only the keys of this level split
    with pytest.raises(ValueError, match="config key 'memory.k' \\(command line\\) conflicts with a scalar value"):
        nest({"memory": 3, "memory.k": 8}, source="command line")
    with pytest.raises(ValueError, match="config key 'memory' conflicts"):
        nest({"memory.k": 8, "memory": 3})


def test_model_and_job_config_share_the_resolver():
    cfg = make_config("tiny", dim=128, **{"memory.heads": 2}, memory_layers="1,2", n_kv_heads="2",
                      memory={"value_init_std": 0})
    assert (cfg.dim, cfg.memory.heads, cfg.memory_layers, cfg.n_kv_heads, cfg.memory.value_init_std) == \
        (128, 2, (1, 2), 2, 0.0)
    with pytest.raises(ValueError, match="config key 'model.memory.k': 'x' has the wrong type: expected int"):
        resolve_config(None, {"max_steps": 1, "model.memory.k": "x"})
    with pytest.raises(ValueError, match=r"config key 'data.text': \[\{'a': 1\}\] has the wrong type: expected list\[str\]"):
        resolve_config(None, {"max_steps": 1, "data.text": [{"a": 1}]})


def test_explicit_betas_stay_floats():
    """A bare `tuple` annotation once made every explicit optim.betas tuple(int(b)) = (0, 0)."""
    assert resolve_config(None, {"max_steps": 1, "optim.betas": "(0.8,0.99)"}).optim.betas == (0.8, 0.99)
    assert resolve_config(None, {"max_steps": 1, "optim.betas": [0.9, 0.95]}).fingerprint() == \
        resolve_config(None, {"max_steps": 1}).fingerprint()


@pytest.mark.parametrize("name", ["world_n65k/pretrain", "world_n65k/background", "tiny_fact_learning"])
def test_a_recorded_config_yaml_resolves_to_its_fingerprint(name):
    """What the trainer records (config.yaml: the fingerprint beside the resolved config) read back as evaluate
    reads it gives the same config: every key's type survives the YAML round trip."""
    from training.evaluate_checkpoint import _flatten
    config = resolve_config(f"recipes/configs/{name}.yaml", {"init_from": "x", "output_dir": "/tmp/unused"})
    recorded = yaml.safe_load(yaml.safe_dump({"fingerprint": config.fingerprint(), **config.to_dict()}))
    stored = recorded.pop("fingerprint")
    again = resolve_config(None, _flatten(recorded))
    assert again == config and again.fingerprint() == stored
