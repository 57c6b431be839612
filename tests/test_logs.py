"""The package logger: rank 0 only by default, every rank on request, per-record opt-in."""
import io
import logging

import pytest

from megatron_ultralong.logs import setup_logging


@pytest.fixture
def stream(monkeypatch):
    monkeypatch.delenv("MU_LOG_ALL_RANKS", raising=False)
    buf = io.StringIO()
    yield buf
    setup_logging(all_ranks=False, stream=None)


def test_rank_zero_only_by_default(monkeypatch, stream):
    log = logging.getLogger("megatron_ultralong.some.module")
    monkeypatch.setenv("RANK", "3")
    setup_logging(stream=stream)
    log.info("hidden on rank 3")
    log.info("kept on rank 3", extra={"all_ranks": True})
    monkeypatch.setenv("RANK", "0")
    log.info("shown on rank 0")
    out = stream.getvalue()
    assert "hidden on rank 3" not in out
    assert "kept on rank 3" in out and "shown on rank 0" in out


def test_all_ranks_stamps_rank(monkeypatch, stream):
    monkeypatch.setenv("RANK", "5")
    setup_logging(all_ranks=True, stream=stream)
    logging.getLogger("megatron_ultralong.x").warning("from five")
    assert "rank 5] from five" in stream.getvalue()


def test_a_closed_earlier_stream_is_replaced_not_flushed(monkeypatch, stream):
    monkeypatch.setenv("RANK", "0")
    old = io.StringIO()
    setup_logging(stream=old)
    old.close()
    setup_logging(stream=stream)  # must not flush the closed stream
    logging.getLogger("megatron_ultralong.y").info("after")
    assert "after" in stream.getvalue()
