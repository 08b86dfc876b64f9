-- Version 2: what several bot processes on one database share.

-- One row per bot process, written at start and by its heartbeat. A process is alive while it
-- holds the session advisory lock (bot process class, its id): PostgreSQL drops the lock when
-- the process's connection ends, kill -9 included, so liveness needs no clock. state is what
-- /status shows of it (mode, breakers, drain).
CREATE TABLE processes (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name TEXT NOT NULL,
    started_at DOUBLE PRECISION NOT NULL,
    beat_at DOUBLE PRECISION NOT NULL,
    stopped_at DOUBLE PRECISION,
    state JSONB NOT NULL DEFAULT '{}'::jsonb
);

-- The DataStore's documents (maintenance, guild_settings, admins, breakers) when the bot runs on
-- PostgreSQL: one JSONB row each with a version that every write increments under the row's lock.
CREATE TABLE shared_state (
    name TEXT PRIMARY KEY,
    data JSONB NOT NULL,
    version BIGINT NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    updated_by TEXT
);
-- The versions each write replaced (the JSON DataStore's backups): recover() falls back to them.
CREATE TABLE shared_state_history (
    name TEXT NOT NULL,
    version BIGINT NOT NULL,
    data JSONB NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (name, version)
);

-- Rows copied by `python -m bot storage migrate-sqlite-to-postgres`, by source table and source
-- key, so that running it again copies nothing twice (even rows housekeeping has deleted since).
CREATE TABLE sqlite_imports (
    source_table TEXT NOT NULL,
    source_key TEXT NOT NULL,
    imported_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (source_table, source_key)
);
