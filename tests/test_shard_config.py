"""ShardConfig: flags over IMGSEARCH_SHARD_* environment over defaults; attribute schema parsing."""

from pathlib import Path

import pytest

from shard_server.config import ShardConfig, parse_attribute_schema


def test_flags_override_environment_override_defaults():
    env = {"IMGSEARCH_SHARD_DATA_DIR": "/env/dir", "IMGSEARCH_SHARD_NPROBE": "32",
           "IMGSEARCH_SHARD_PORT": "7000", "IMGSEARCH_SHARD_METRICS_PORT": "none",
           "IMGSEARCH_SHARD_ATTRIBUTE_SCHEMA": "brand:text,weight:number"}
    config = ShardConfig.from_env(["--port", "7001", "--rerank-factor", "8", "--snapshot-interval-s", "2.5"], env=env)
    assert config.data_dir == Path("/env/dir")
    assert (config.port, config.nprobe, config.rerank_factor, config.metrics_port) == (7001, 32, 8, None)
    assert config.snapshot_interval_s == 2.5
    assert config.attribute_kinds == {"brand": "text", "weight": "number"}
    assert ShardConfig.from_env(["--data-dir", "d"], env={}).attribute_kinds == {
        "brand": "text", "colour": "text", "price": "number", "in_stock": "flag"}


def test_derived_nlist_and_training_threshold():
    config = ShardConfig(data_dir=Path("d"))
    assert config.nlist_for(1_000_000) == 4000
    assert config.factory_for(4000) == "IVF4000,PQ64x4fs"
    # Small partitions get fewer lists, each with at least 39 training points: 12,500 rows -> 320, not 447.
    assert config.nlist_for(12_500) == 12_500 // 39
    assert config.nlist_for(40_000) == 800
    assert config.training_threshold() == config.min_train_rows == 10_000
    fixed = ShardConfig(data_dir=Path("d"), nlist=256)
    assert fixed.nlist_for(10) == 256
    assert fixed.training_threshold() == 39 * 256


def test_bad_settings_are_refused():
    with pytest.raises(SystemExit):
        ShardConfig.from_env([], env={})
    with pytest.raises(ValueError, match="bad attribute schema"):
        parse_attribute_schema("brand:string")
    with pytest.raises(ValueError, match="declared twice"):
        parse_attribute_schema("a:text,a:flag")
    with pytest.raises(ValueError):
        ShardConfig(data_dir=Path("d"), dimension=0)
    with pytest.raises(ValueError, match="max_stream_bytes"):  # one log frame, 32-bit length
        ShardConfig(data_dir=Path("d"), max_stream_bytes=5 << 30)


def test_event_loop_setting():
    assert ShardConfig.from_env(["--data-dir", "d"], env={}).event_loop == "asyncio"
    env = {"IMGSEARCH_SHARD_EVENT_LOOP": "uvloop"}
    assert ShardConfig.from_env(["--data-dir", "d"], env=env).event_loop == "uvloop"
    with pytest.raises(ValueError, match="unknown event loop .trio."):
        ShardConfig(data_dir=Path("d"), event_loop="trio")
