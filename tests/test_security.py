"""Security (issue #17): where runtime adapter loads may read, tenants' keys, and chat templates
from model files that try to reach Python internals.

The live-server tests of tenant isolation (list, use, load, unload: 404/403) are in
tests/test_server.py (test_tenant_isolation, test_runtime_loads_are_confined_and_private);
here the same rules are checked on the pieces, without a model.
"""

from __future__ import annotations

import hmac
import logging
import os
import shutil
import stat

import pytest
from test_adapter_formats import CFG, hf_pairs, peft_tensors, write_peft
from test_tokenizer import byte_level_fields

from edgelora_np.adapters.store import AdapterStore
from edgelora_np.errors import AdapterError, TokenizerError
from edgelora_np.server.openai_api import confined, snapshot
from edgelora_np.server.service import ApiError, ServerOptions, Service
from edgelora_np.server.tenants import Tenants, hash_key
from edgelora_np.tokenizer import Tokenizer

PAIRS = hf_pairs(rank=2, layers=(0,), projs=("attn_v",))


@pytest.fixture
def roots(tmp_path):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    write_peft(allowed / "good", peft_tensors(PAIRS), r=2, target_modules=["v_proj"])
    write_peft(outside / "evil", peft_tensors(PAIRS), r=2, target_modules=["v_proj"])
    return allowed, outside


def status_of(path, allowed) -> int:
    try:
        confined(str(path), (str(allowed),))
    except ApiError as e:
        assert e.param == "lora_path" and e.message
        return e.status
    return 200


def test_paths_under_the_root_are_allowed(roots):
    allowed, _ = roots
    assert status_of(allowed / "good", allowed) == 200
    assert status_of(allowed / "good" / "adapter_model.safetensors", allowed) == 200
    assert status_of(allowed / "sub" / ".." / "good", allowed) == 200


def test_escapes_are_refused(roots, tmp_path):
    allowed, outside = roots
    (allowed / "link").symlink_to(outside / "evil")
    inner = allowed / "inner"
    shutil.copytree(allowed / "good", inner)
    (inner / "adapter_model.safetensors").unlink()          # a file inside links outside
    (inner / "adapter_model.safetensors").symlink_to(outside / "evil" / "adapter_model.safetensors")
    for path in (outside / "evil", allowed / ".." / "outside" / "evil", allowed / "link",
                 inner, "/etc/passwd", "/", allowed / ".." / ".."):
        assert status_of(path, allowed) == 403, path
    assert status_of("no\0such", allowed) == 400            # was a 500 (ValueError)
    with pytest.raises(ApiError) as e:
        confined(str(allowed / "good"), ())
    assert e.value.status == 403                            # loading off without roots


def test_fifos_and_devices_are_refused(roots):
    allowed, _ = roots
    os.mkfifo(allowed / "pipe")
    (allowed / "zero").symlink_to("/dev/zero")
    fifo_dir = allowed / "fifo_dir"
    shutil.copytree(allowed / "good", fifo_dir)
    (fifo_dir / "adapter_config.json").unlink()
    os.mkfifo(fifo_dir / "adapter_config.json")
    for path in (allowed / "pipe", allowed / "zero", fifo_dir):
        assert status_of(path, allowed) == 403, path
    if os.geteuid() == 0:                                   # a device node inside the root
        os.mknod(allowed / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
        assert status_of(allowed / "null", allowed) == 403


def test_a_load_reads_a_private_copy_made_without_following_links(roots):
    allowed, _ = roots
    checked, root = confined(str(allowed / "good"), (str(allowed),))
    with snapshot(str(allowed / "good"), checked, root) as copy:
        assert sorted(p.name for p in copy.iterdir()) == sorted(
            p.name for p in (allowed / "good").iterdir())
        for f in copy.iterdir():
            assert f.read_bytes() == (allowed / "good" / f.name).read_bytes()
    assert not copy.exists()                                  # removed after the import


@pytest.mark.parametrize("swap", ["file", "directory", "fifo"])
def test_a_link_swapped_in_after_the_check_is_refused(roots, swap):
    """The race the check alone loses: the path is checked, then a file (or the directory
    itself) becomes a symlink out of the root, or a FIFO, before it is read."""
    allowed, outside = roots
    good = allowed / "good"
    checked, root = confined(str(good), (str(allowed),))
    if swap == "file":
        (good / "adapter_model.safetensors").unlink()
        (good / "adapter_model.safetensors").symlink_to(outside / "evil" /
                                                        "adapter_model.safetensors")
    elif swap == "directory":
        shutil.rmtree(good)
        good.symlink_to(outside / "evil")
    else:
        (good / "adapter_config.json").unlink()
        os.mkfifo(good / "adapter_config.json")
    with pytest.raises(ApiError) as e:
        with snapshot(str(good), checked, root):
            pass
    assert e.value.status == 403 and "changed into a link, FIFO or device" in e.value.message


def test_store_import_refuses_a_fifo_instead_of_hanging(tmp_path):
    # Was: _source_sha256 opened the FIFO and waited for a writer forever.
    os.mkfifo(tmp_path / "pipe.gguf")
    store = AdapterStore(tmp_path / "store", create=True)
    with pytest.raises(AdapterError, match="not a regular file"):
        store.import_adapter(tmp_path / "pipe.gguf", CFG, "fp")


# --- tenants ------------------------------------------------------------------------------------

KEYS = {"alice": "alice-secret-key", "bob": "bob-secret-key"}


@pytest.fixture
def service(tmp_path):
    path = tmp_path / "keys.toml"
    path.write_text("".join(f'[tenants.{t}]\nkey_sha256 = "{hash_key(k)}"\nadapters = ["{t}-*"]\n'
                            f"can_load = true\n\n" for t, k in KEYS.items()))
    s = Service(ServerOptions(), Tenants.load(path))
    s.model_id = "base"
    for name in ("alice-a", "bob-b"):
        s.catalog.add(name, f"/x/{name}")
    return s


def test_tenants_see_and_resolve_only_their_adapters(service):
    alice = service.authenticate(KEYS["alice"])
    bob = service.authenticate(KEYS["bob"])
    assert service.lora_ids(alice) == ["alice-a"] and service.lora_ids(bob) == ["bob-b"]
    assert service.resolve_model(alice, "alice-a") == "alice-a"
    for tenant, other in ((alice, "bob-b"), (bob, "alice-a")):
        with pytest.raises(ApiError) as hidden:
            service.resolve_model(tenant, other, param="lora_name", auto=False)
        with pytest.raises(ApiError) as missing:
            service.resolve_model(tenant, other + "x", param="lora_name", auto=False)
        assert hidden.value.status == missing.value.status == 404
        assert hidden.value.message.replace(other, "?") == missing.value.message.replace(other + "x", "?")


def test_keys_are_compared_in_constant_time_against_every_tenant(service, monkeypatch, caplog):
    calls = []
    real = hmac.compare_digest

    def counting(a, b):
        calls.append(1)
        return real(a, b)
    monkeypatch.setattr(hmac, "compare_digest", counting)
    caplog.set_level(logging.DEBUG)
    assert service.authenticate(KEYS["alice"]).name == "alice"
    assert len(calls) == len(KEYS)            # no early exit on the first match
    assert service.authenticate("wrong") is None and service.authenticate("") is None
    text = caplog.text + service.metrics.render().decode()
    assert not any(k in text for k in KEYS.values())


# --- chat templates from model files ------------------------------------------------------------

SSTI = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ joiner.__init__.__globals__ }}",
    "{{ lipsum.__globals__['os'].system('id') }}",
    "{{ self._TemplateReference__context }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ raise_exception.__globals__ }}",
    "{{ strftime_now.__globals__['__builtins__'] }}",
    "{% for c in [].__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
    "{{ messages.append({'role': 'system'}) }}",
    "{{ messages[0].update({'content': 'pwned'}) }}",
    "{{ request }}{{ config.items() }}",
    "{{ 'x' * 10**10 }}",
    "{{ 10 ** 10 ** 10 }}",
    "{% for i in range(10**12) %}{% endfor %}",
    "{{ (1).__class__.__bases__[0].__subclasses__() }}",
    "{{ 1 / 0 }}",
]


@pytest.mark.parametrize("template", SSTI)
def test_template_injection_is_contained(template):
    fields = byte_level_fields()
    fields["tokenizer.chat_template"] = template
    tok = Tokenizer.from_gguf_fields(fields)
    messages = [{"role": "user", "content": "hi"}]
    try:
        out = tok.apply_chat_template(messages)
    except TokenizerError:
        out = ""
    assert "uid=" not in out and "Popen" not in out and "<class" not in out
    assert messages == [{"role": "user", "content": "hi"}]
