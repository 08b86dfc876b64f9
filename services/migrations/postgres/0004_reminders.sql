-- Version 4: reminders (plugins/remind.py), as SQLite's migration 7.
-- What to tell whom, where and when. A due reminder is handed to the queue as an outbound item
-- (its dedup key names the reminder) and then marked fired.
CREATE TABLE reminders (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id BIGINT NOT NULL,
    channel_id BIGINT NOT NULL,
    guild_id BIGINT,
    source_id BIGINT NOT NULL,
    text TEXT NOT NULL,
    due_at DOUBLE PRECISION NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    fired_at DOUBLE PRECISION
);
CREATE INDEX reminders_due ON reminders (due_at) WHERE fired_at IS NULL;
CREATE INDEX reminders_by_user ON reminders (user_id, due_at) WHERE fired_at IS NULL;
