"""SHARD_COUNT and SHARD_IDS: discord.py's AutoShardedClient, one process or one process per shard."""

from __future__ import annotations

import pytest

from services.config import SHARD_AUTO, Config, ConfigError, load_config


def load(**environ: str) -> Config:
    return load_config(environ=environ, env_file=None)


def test_unsharded_is_the_default() -> None:
    config = load()
    assert (config.shard_count, config.shard_ids, config.sharded) == (None, (), False)
    assert config.redacted()["SHARD_COUNT"] == "<not set>"


def test_a_count_alone_means_every_shard_here_and_auto_asks_discord() -> None:
    assert (load(SHARD_COUNT="3").shard_count, load(SHARD_COUNT="3").shard_ids) == (3, ())
    auto = load(SHARD_COUNT="auto")
    assert auto.shard_count == SHARD_AUTO and auto.sharded and auto.redacted()["SHARD_COUNT"] == "auto"


def test_ids_are_this_process_s_shards_sorted() -> None:
    config = load(SHARD_COUNT="4", SHARD_IDS="3, 1")
    assert config.shard_ids == (1, 3) and config.redacted()["SHARD_IDS"] == "1,3"


@pytest.mark.parametrize(
    ("environ", "name", "problem"),
    [
        ({"SHARD_COUNT": "0"}, "SHARD_COUNT", "'0' is not a shard count"),
        ({"SHARD_COUNT": "many"}, "SHARD_COUNT", "'many' is not a shard count"),
        ({"SHARD_COUNT": "3", "SHARD_IDS": "one"}, "SHARD_IDS", "not shard ids: 'one'"),
        ({"SHARD_COUNT": "3", "SHARD_IDS": "1,1"}, "SHARD_IDS", "'1,1' names a shard twice"),
        ({"SHARD_IDS": "0"}, "SHARD_IDS",
         "is set without a SHARD_COUNT: a shard's guilds depend on the total count"),
        ({"SHARD_COUNT": "auto", "SHARD_IDS": "0"}, "SHARD_IDS",
         "is set without a SHARD_COUNT: a shard's guilds depend on the total count"),
        ({"SHARD_COUNT": "3", "SHARD_IDS": "1,3,4"}, "SHARD_IDS",
         "names shard 3, 4, but SHARD_COUNT=3 has shards 0 to 2"),
    ],
)
def test_each_problem_is_one_sentence_with_a_fix(environ: dict[str, str], name: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(**environ)
    [found] = info.value.problems
    assert (found.name, found.problem) == (name, problem) and found.fix

