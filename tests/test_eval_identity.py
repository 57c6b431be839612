"""Evaluation results are keyed on what produced them: a grid file is never reused by other
weights (a YaRN conversion of the same weights included), another tokenizer or another backend;
a header cut by a crash does not lock out the next run; `--tokenizer DIR/tokenizer.json` and
`--tokenizer DIR` load the same tokenizer; a read-only --out fails before the model loads."""
import json
import logging
import os

import pytest
import transformers

from eval_helpers import save_tiny_hf
from megatron_ultralong.eval import EvalTokenizer, HFBackend
from megatron_ultralong.eval.cli import main
from megatron_ultralong.model.config import extend_context, load_model_config

FLAGS = ["--lengths", "160", "--depths", "0", "1", "--max-new-tokens", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ident")
    tok_dir, base = save_tiny_hf(str(root))
    # the converter's YaRN config on the very same weights (what `mu-convert --yarn-target` writes)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, local_files_only=True)
    cfg = extend_context(load_model_config(base), 16384, 4096, 4.0, 1.0)
    yarn = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg.to_hf("float32")))
    yarn.load_state_dict(model.state_dict())
    yarn_dir = str(root / "yarn")
    yarn.save_pretrained(yarn_dir)
    return tok_dir, base, yarn_dir


def _run(model, tok, out, *extra):
    main(["--model", model, "--tokenizer", tok, "--out", str(out), *FLAGS, *extra], command="niah")


def _cells(out):
    return (out / "niah_cells.jsonl").read_text().splitlines()


def test_yarn_conversion_does_not_reuse_the_base_models_cells(dirs, tmp_path, capsys):
    tok, base, yarn = dirs
    fb = HFBackend.from_pretrained(base, device="cpu").fingerprint
    fy = HFBackend.from_pretrained(yarn, device="cpu").fingerprint
    assert fb.split("/")[1] == fy.split("/")[1] and fb != fy  # same tensors, config (RoPE) differs
    _run(base, tok, tmp_path)
    with pytest.raises(SystemExit) as e:
        _run(yarn, tok, tmp_path)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "niah_cells.jsonl: written by a run with a different configuration (identity.weights:" in err
    assert len(_cells(tmp_path)) == 3  # nothing appended, nothing reused


def test_other_weights_tokenizer_or_backend_refused(dirs, tmp_path, capsys):
    tok, base, _ = dirs
    _run(base, tok, tmp_path)
    # one weight changed by a training step: the tensors' hash changes
    m = transformers.AutoModelForCausalLM.from_pretrained(base, local_files_only=True)
    before = HFBackend(m).fingerprint
    with __import__("torch").no_grad():
        m.model.norm.weight[0] += 1e-3
    assert HFBackend(m).fingerprint != before
    # another backend numerics (dtype): refused
    with pytest.raises(SystemExit):
        _run(base, tok, tmp_path, "--dtype", "bfloat16")
    assert "identity.backend: 'hf/torch.float32/cpu' != 'hf/torch.bfloat16/cpu'" in capsys.readouterr().err
    # another tokenizer (other merges, same special tokens): refused
    other = tmp_path / "tok2"
    from eval_helpers import train_tiny_tokenizer
    train_tiny_tokenizer(390).save_pretrained(str(other))
    with pytest.raises(SystemExit):
        _run(base, str(other), tmp_path)
    assert "identity.tokenizer:" in capsys.readouterr().err


def test_tokenizer_file_and_directory_load_the_same(dirs, tmp_path, caplog):
    tok, base, _ = dirs
    a = EvalTokenizer.from_path(tok)
    b = EvalTokenizer.from_path(os.path.join(tok, "tokenizer.json"))
    assert (a.bos_id, a.stop_ids, a.fingerprint) == (b.bos_id, b.stop_ids, b.fingerprint)
    assert a.bos_id is not None and a.stop_ids
    text = "The grass is green. 12345"
    assert a.encode(text) == b.encode(text)
    # so a run with one spelling resumes with the other
    _run(base, tok, tmp_path)
    _run(base, os.path.join(tok, "tokenizer.json"), tmp_path)
    assert len(_cells(tmp_path)) == 3
    # a bare tokenizer.json (no tokenizer_config.json beside it) says what it lacks
    bare = tmp_path / "bare" / "tokenizer.json"
    bare.parent.mkdir()
    bare.write_bytes(open(os.path.join(tok, "tokenizer.json"), "rb").read())
    with caplog.at_level(logging.WARNING, logger="megatron_ultralong.eval.tokenizer"):
        c = EvalTokenizer.from_path(str(bare))
    assert c.bos_id is None and c.fingerprint != a.fingerprint
    assert any("no BOS is prepended and no EOS stops decoding" in r.getMessage() for r in caplog.records)


def test_a_header_cut_by_a_crash_does_not_refuse_the_next_run(dirs, tmp_path):
    tok, base, _ = dirs
    cells = tmp_path / "niah_cells.jsonl"
    cells.write_text('{"header": {"task": "ni')  # the first run died writing its header
    _run(base, tok, tmp_path)
    lines = _cells(tmp_path)
    assert len(lines) == 3 and json.loads(lines[0])["header"]["identity"]["weights"].startswith("config=")
    _run(base, tok, tmp_path)  # and the file of valid cells resumes
    assert _cells(tmp_path) == lines


def test_cells_without_a_header_are_not_attributed(dirs, tmp_path, capsys):
    tok, base, _ = dirs
    (tmp_path / "niah_cells.jsonl").write_text('{"cell": "length=160/depth=0.0", "result": {}}\n')
    with pytest.raises(SystemExit):
        _run(base, tok, tmp_path)
    assert "line 1: cells without a header line" in capsys.readouterr().err


@pytest.mark.parametrize("out", ["/proc/mu_eval_out", "FILE"])
def test_unwritable_out_fails_before_the_model_loads(dirs, tmp_path, capsys, monkeypatch, out):
    tok, base, _ = dirs
    if out == "FILE":
        out = str(tmp_path / "f")
        open(out, "w").close()
    loaded = []
    monkeypatch.setattr(HFBackend, "from_pretrained", classmethod(lambda *a, **k: loaded.append(1)))
    with pytest.raises(SystemExit) as e:
        _run(base, tok, out)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and not loaded
    assert len(err) == 1 and err[0].startswith(f"mu-eval-niah: error: --out={out!r}: cannot create the directory")
