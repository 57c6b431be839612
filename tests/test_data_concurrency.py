"""Builds that cannot mix: one build per output prefix (a lock that holds across nodes and PID
namespaces), temporaries removed only when their owner is known dead or they are old, a commit
that refuses when a temporary is missing or an output appeared, and duplicate inputs read once."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
from data_helpers import corpus_records, make_recipe, tokenizer_path, write_jsonl

from megatron_ultralong.data.preprocess.builder import build_dataset
from megatron_ultralong.data.preprocess.cli import main as cli_main
from megatron_ultralong.data.preprocess.indexed import AtomicOutputs, remove_stale_temporaries
from megatron_ultralong.data.preprocess.prefix_lock import LockHeldError, PrefixLock, host_tag

RECORDS = corpus_records(60, seed=23)
OFF = {"fast_path": "off"}


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _fake_lock(path: str, **owner) -> None:
    with open(path, "w") as f:
        json.dump({"host": "other-node", "host_tag": "0badc0de", "pid": 1, "start": "1",
                   "nonce": "x", "since": time.time(), **owner}, f)


def test_second_build_of_a_prefix_is_refused_naming_the_owner(tmp_path):
    prefix = str(tmp_path / "ds")
    with PrefixLock(prefix) as first:
        with pytest.raises(LockHeldError, match=rf"another build holds .*pid {os.getpid()}"):
            PrefixLock(prefix).acquire()
        first.verify()
    assert not os.path.exists(first.path)  # released
    PrefixLock(prefix).acquire()  # and free again


def test_lock_of_another_node_or_namespace_is_not_judged_by_its_pid(tmp_path):
    """A pid from another host or PID namespace says nothing here: such a lock is stale only
    once it stops being refreshed. One of this host whose process is gone is stale at once."""
    prefix = str(tmp_path / "ds")
    lock = PrefixLock(prefix)
    _fake_lock(lock.path, pid=_dead_pid())  # dead *here*, but the owner is another node
    with pytest.raises(LockHeldError, match="host other-node"):
        lock.acquire()
    old = time.time() - 2 * lock.stale_s
    os.utime(lock.path, (old, old))  # no heartbeat for a long time: the owner is gone
    assert lock.acquire()["host"] == "other-node"
    lock.release()
    _fake_lock(lock.path, host_tag=host_tag(), pid=_dead_pid(), start=None)
    assert PrefixLock(prefix).acquire()["host_tag"] == host_tag()


def test_lost_lock_is_detected_before_publishing(tmp_path):
    lock = PrefixLock(str(tmp_path / "ds"))
    lock.acquire()
    _fake_lock(lock.path)  # another build broke it and took over
    with pytest.raises(LockHeldError, match="lost its lock"):
        lock.verify()
    lock.release()
    assert os.path.exists(lock.path)  # the other build's lock is left alone


def test_temporaries_of_another_node_stay_until_old(tmp_path):
    """The old rule (a pid not visible here is dead) deleted a live build's temporaries on
    another node; now only a dead owner on this host, or age, removes them."""
    dead = _dead_pid()
    here_dead = tmp_path / f".ds.pool-{dead}-{host_tag()}.bin"
    other = tmp_path / f".ds.pool-{dead}-0badc0de.bin"
    legacy = tmp_path / f".ds.partial-{dead}.idx"
    for p in (here_dead, other, legacy):
        p.write_bytes(b"\0")
    assert remove_stale_temporaries(str(tmp_path / "ds")) == [str(here_dead)]
    old = time.time() - 7200
    os.utime(other, (old, old))
    assert remove_stale_temporaries(str(tmp_path / "ds"), stale_s=3600) == [str(other)]
    assert legacy.exists()


def test_commit_refuses_missing_temporary_and_new_output(tmp_path):
    prefix = str(tmp_path / "ds")
    out = AtomicOutputs(prefix, (".bin", ".idx"), overwrite=False)
    open(out.path(".bin"), "wb").close()
    with pytest.raises(FileNotFoundError, match=r"\.idx disappeared"):
        out.commit()
    assert not os.path.exists(prefix + ".bin")  # nothing published
    open(out.path(".idx"), "wb").close()
    open(prefix + ".idx", "wb").close()  # a faster build finished meanwhile
    with pytest.raises(FileExistsError, match="exists"):
        out.commit()
    assert os.path.getsize(prefix + ".idx") == 0 and not os.path.exists(prefix + ".bin")


def test_concurrent_cli_build_is_refused_and_the_first_finishes(tmp_path, capsys):
    corpus = write_jsonl(str(tmp_path / "c.jsonl"), list(RECORDS) * 30)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"inputs": [corpus], "tokenizer": {"path": tokenizer_path(), **OFF},
                                  "output": {"prefix": str(tmp_path / "ds")}, "workers": 0,
                                  "batch_bytes": 4096}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    first = subprocess.Popen([sys.executable, "-m", "megatron_ultralong.data.preprocess.cli",
                              "--config", str(recipe), "--no-progress"], env=env,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / ".ds.lock").exists():
        time.sleep(0.02)
    assert cli_main(["--config", str(recipe), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another build holds" in err[0] and f"pid {first.pid}" in err[0], err
    _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err
    assert (tmp_path / "ds.idx").exists() and not (tmp_path / ".ds.lock").exists()


@pytest.mark.parametrize("delay", [0.03, 0.1, 0.3])
def test_sigint_is_one_line_exit_130_and_leaves_nothing(tmp_path, delay):
    """Ctrl-C once the workers exist, also while they are still importing (short delays: they printed
    KeyboardInterrupt tracebacks about half the time), ends in one line."""
    corpus = write_jsonl(str(tmp_path / "c.jsonl"), list(RECORDS) * 60)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"inputs": [corpus], "tokenizer": {"path": tokenizer_path(), **OFF},
                                  "output": {"prefix": str(tmp_path / "ds")}, "workers": 2,
                                  "batch_bytes": 4096}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "megatron_ultralong.data.preprocess.cli",
                             "--config", str(recipe), "--no-progress"], env=env,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    children = f"/proc/{proc.pid}/task/{proc.pid}/children"
    deadline = time.time() + 120  # until both workers exist (spawned: still importing at first)
    while time.time() < deadline and proc.poll() is None and len(open(children).read().split()) < 2:
        time.sleep(0.002)
    time.sleep(delay)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the whole process group, workers included
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 130, err
    assert lines[-1] == "error: interrupted (SIGINT); temporary files removed", err
    assert "Traceback" not in err, err
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".ds.")]


def test_duplicate_inputs_are_read_once_with_a_warning(tmp_path, caplog):
    corpus = write_jsonl(str(tmp_path / "tiny_corpus.jsonl"), RECORDS)
    os.symlink(corpus, tmp_path / "link.jsonl")
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(open(corpus, "rb").read())
    prefix = str(tmp_path / "ds")

    def docs(inputs):
        recipe = make_recipe(inputs, prefix, tokenizer=OFF, output={"prefix": prefix, "overwrite": True})
        return build_dataset(recipe, progress=False)["input"]["documents"]

    single = docs([corpus])
    caplog.set_level(logging.WARNING)
    for inputs in ([corpus, corpus], [corpus, str(tmp_path / "link.jsonl")],
                   [corpus, str(tmp_path / "tiny_*.jsonl")], [corpus, str(copy)]):
        caplog.clear()
        assert docs(inputs) == single, inputs
        assert any("reading it once" in r.getMessage() and corpus in r.getMessage()
                   for r in caplog.records), inputs
    with pytest.raises(ValueError, match="different domains"):
        docs([{"path": corpus, "domain": "a"}, {"path": str(copy), "domain": "b"}])
