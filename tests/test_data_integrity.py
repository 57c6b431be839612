"""No data silently lost or refused: truncated/corrupt compressed or Parquet input is fatal with
file and offset (never a skippable record), a UTF-8 BOM is valid, OS errors are one line naming
the path, a killed build's pool files are removed, and the CLI takes what users pass."""
from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from data_helpers import corpus_records, make_recipe, tokenizer_path, write_jsonl

from megatron_ultralong.data.preprocess.builder import build_dataset
from megatron_ultralong.data.preprocess.cli import main as cli_main
from megatron_ultralong.data.preprocess.readers import CorruptInputError

RECORDS = corpus_records(400, seed=21)
OFF = {"fast_path": "off"}  # these tests are about reading and writing, not the fast path


def _jsonl_bytes(records) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()


def _build(tmp_path, inputs, **kw):
    return build_dataset(make_recipe(inputs, str(tmp_path / "ds"), tokenizer=OFF,
                                     output={"prefix": str(tmp_path / "ds"), "overwrite": True},
                                     **kw), progress=False)


@pytest.mark.parametrize("suffix", [".jsonl.zst", ".jsonl.gz"])
def test_truncated_compressed_stream_is_fatal_naming_file_and_byte(tmp_path, suffix):
    data = _jsonl_bytes(RECORDS)
    if suffix.endswith(".zst"):
        import zstandard

        packed = zstandard.ZstdCompressor().compress(data)
    else:
        packed = gzip.compress(data)
    whole = tmp_path / f"whole{suffix}"
    whole.write_bytes(packed)
    assert _build(tmp_path, [str(whole)])["input"]["documents"] == len(RECORDS)
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(packed[: len(packed) // 2])
    for skip_bad in (False, True):  # --skip-bad must not turn it into a skipped record
        with pytest.raises(CorruptInputError, match=rf"{cut}: .*compressed byte \d+"):
            _build(tmp_path, [str(cut)], skip_bad=skip_bad)


def test_multi_frame_zst_reads_every_frame(tmp_path):
    import zstandard

    a, b = _jsonl_bytes(RECORDS[:100]), _jsonl_bytes(RECORDS[100:])
    path = tmp_path / "two.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(a) + zstandard.ZstdCompressor().compress(b))
    assert _build(tmp_path, [str(path)])["input"]["documents"] == len(RECORDS)


def test_corrupt_and_truncated_parquet_is_fatal(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"text": [r["text"] for r in RECORDS],
                             "domain": [r["domain"] for r in RECORDS]}), good, row_group_size=50)
    raw = good.read_bytes()
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CorruptInputError, match=f"{cut}: not a readable Parquet file"):
        _build(tmp_path, [str(cut)], skip_bad=True)
    # Footer intact, a data page overwritten: fails at the row group, naming the row.
    meta = pq.ParquetFile(good).metadata
    start = meta.row_group(3).column(0).data_page_offset
    bad = bytearray(raw)
    bad[start + 20: start + 400] = os.urandom(380)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(bytes(bad))
    with pytest.raises(CorruptInputError, match=rf"{broken}: Parquet data unreadable from row \d+"):
        _build(tmp_path, [str(broken)], skip_bad=True)


def test_utf8_bom_on_file_and_line_is_valid(tmp_path):
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in RECORDS[:20]]
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + lines[0] + b"\n" + b"\n".join(
        (b"\xef\xbb\xbf" + x if i % 3 == 0 else x) for i, x in enumerate(lines[1:])) + b"\n")
    report = _build(tmp_path, [str(path)])
    assert report["input"]["documents"] == 20 and report["skipped"]["total"] == 0


def test_blank_lines_are_reported_with_file_and_line(tmp_path):
    lines = [json.dumps(r, ensure_ascii=False) for r in RECORDS[:5]]
    path = tmp_path / "blank.jsonl"
    path.write_text(lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n   \n")
    report = _build(tmp_path, [str(path)], skip_bad=True)
    assert report["skipped"]["by_reason"] == {"blank line": 2}
    assert f"{path}:2: blank line" in report["skipped"]["examples"]
    assert f"{path}:7: blank line" in report["skipped"]["examples"]
    assert report["input"]["documents"] == 5


def _recipe_file(tmp_path, inputs, prefix) -> str:
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps({"inputs": inputs, "tokenizer": {"path": tokenizer_path(), **OFF},
                                "output": {"prefix": prefix}, "workers": 0}))
    return str(path)


def test_cli_accepts_overrides_after_flags_and_a_tokenizer_directory(tmp_path, capsys):
    corpus = write_jsonl(str(tmp_path / "c.jsonl"), RECORDS[:20])
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    (tok_dir / "tokenizer.json").write_bytes(open(tokenizer_path(), "rb").read())
    recipe = _recipe_file(tmp_path, [corpus], str(tmp_path / "unused"))
    out = str(tmp_path / "ds")
    assert cli_main(["--config", recipe, "--no-progress", "--output", out,
                     f"tokenizer.path={tok_dir}", "separator.text=null"]) == 0
    assert os.path.exists(out + ".idx")
    stats = json.load(open(out + ".stats.json"))
    assert stats["tokenizer"]["path"] == str(tok_dir / "tokenizer.json")
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    assert cli_main(["--config", recipe, "--no-progress", f"tokenizer.path={empty}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: tokenizer.path={str(empty)!r}: is a directory without tokenizer.json "
                   "(tokenizer.kind='hf')"]


def test_os_errors_are_one_line_naming_the_path(tmp_path, capsys):
    corpus = write_jsonl(str(tmp_path / "c.jsonl"), RECORDS[:10])
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    recipe = _recipe_file(tmp_path, [corpus], str(blocker / "ds"))
    assert cli_main(["--config", recipe, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(blocker) in err[0], err
    gz = tmp_path / "t.jsonl.gz"
    gz.write_bytes(gzip.compress(_jsonl_bytes(RECORDS))[:-40])
    recipe = _recipe_file(tmp_path, [str(gz)], str(tmp_path / "ds"))
    assert cli_main(["--config", recipe, "--no-progress", "--skip-bad"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(gz) in err[0] and "compressed byte" in err[0], err


def test_stale_pool_files_are_removed_by_the_next_run(tmp_path):
    corpus = write_jsonl(str(tmp_path / "c.jsonl"), RECORDS[:10])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer exists
    from megatron_ultralong.data.preprocess.prefix_lock import host_tag

    tag = host_tag()
    stale = [tmp_path / f".ds.pool-{dead.pid}-{tag}.bin", tmp_path / f".ds.partial-{dead.pid}-{tag}.idx"]
    live = tmp_path / f".ds.pool-{os.getppid()}-{tag}.bin"  # a live process's files stay
    for p in stale + [live]:
        p.write_bytes(b"\0" * 64)
    _build(tmp_path, [corpus])
    assert not any(p.exists() for p in stale) and live.exists()


def test_sigterm_removes_pool_files(tmp_path):
    """A build killed by SIGTERM mid-tokenization leaves no pool or partial file behind."""
    corpus = write_jsonl(str(tmp_path / "c.jsonl"), list(RECORDS) * 20)
    recipe = _recipe_file(tmp_path, [corpus], str(tmp_path / "ds"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "megatron_ultralong.data.preprocess.cli", "--config",
                             recipe, "--no-progress", "batch_bytes=4096"], env=env,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not any(".pool-" in n for n in os.listdir(tmp_path)):
        time.sleep(0.05)
    assert any(".pool-" in n for n in os.listdir(tmp_path)), "the build never started its pool"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM" in err
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".ds.")]


def test_status_lines_when_not_a_terminal(caplog):
    """Batch logs (stderr not a terminal) get periodic status lines with MB/s, percent and ETA."""
    import io
    import logging

    from megatron_ultralong.data.preprocess.progress import StageProgress

    caplog.set_level(logging.INFO, logger="megatron_ultralong.data.preprocess.progress")
    bar = StageProgress("tokenize", 4_000_000, "B", None, interval_s=0.0, stream=io.StringIO())
    assert bar.bar is None  # no tqdm redraws into a log file
    bar.update(1_000_000, docs=10, tokens=250_000)
    bar.update(1_000_000, docs=10, tokens=250_000)
    bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and lines[-1].endswith("(done)")
    assert "tokenize: 20 docs, 500,000 tokens" in lines[1] and "MB/s" in lines[1]
    assert "50.0% of 4.0 MB" in lines[1] and "ETA 0:" in lines[1]
    quiet = StageProgress("tokenize", 10, "B", False, interval_s=0.0, stream=io.StringIO())
    quiet.update(5)
    quiet.close()
    assert len(caplog.records) == 3
