-- Version 5: semantic memory (bot/memory.py, services/pg_memory_store.py), as SQLite's memory.sqlite3.
-- pgvector is not assumed: vectors are float32 bytes (little-endian, as Python's array('f') writes
-- them) and recall is a brute-force cosine in the bot over each owner's bounded set.
-- scope 'user': recalled for owner_id (a user who turned /memory on); scope 'guild': for anyone in
-- guild owner_id. author_id is who said it: /memory forget deletes every row a user authored.
CREATE TABLE memories (
    id BIGSERIAL PRIMARY KEY,
    scope TEXT NOT NULL CHECK (scope IN ('user', 'guild')),
    owner_id BIGINT NOT NULL,
    author_id BIGINT NOT NULL,
    guild_id BIGINT,
    text TEXT NOT NULL,
    answer TEXT NOT NULL DEFAULT '',
    model TEXT NOT NULL,
    vector BYTEA NOT NULL,
    said_at DOUBLE PRECISION NOT NULL,
    created_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX memories_by_owner ON memories (scope, owner_id, id);
CREATE INDEX memories_by_author ON memories (author_id);
-- Users' choices, and when they last said /memory forget (nothing said before is stored after).
CREATE TABLE memory_users (
    user_id BIGINT PRIMARY KEY,
    enabled BOOLEAN NOT NULL DEFAULT FALSE,
    forgot_at DOUBLE PRECISION NOT NULL DEFAULT 0,
    updated_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE memory_guilds (
    guild_id BIGINT PRIMARY KEY,
    forgot_at DOUBLE PRECISION NOT NULL DEFAULT 0
);
