-- Version 1: what services/storage.py keeps in SQLite (its migrations 1 to 5), for PostgreSQL.
-- Forward-only: never edit a shipped file; add the next number. Times are wall-clock seconds
-- (double precision), as the SQLite store keeps them; payloads are the JSON text the bot wrote
-- (text, not jsonb: jsonb refuses a NUL character a user may send, and the text is kept exact).

CREATE TABLE turns (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    conversation_key TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('user', 'model')),
    text TEXT NOT NULL,
    message_id TEXT,
    created_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX turns_by_key ON turns (conversation_key, id);
CREATE INDEX turns_by_time ON turns (created_at);

-- The durable queue. author_id, guild_id and notice are read from the payload by the store when
-- it writes one (SQLite derives them in virtual columns): the caps count the first two, the
-- availability triggers skip notices. claimed_by is the process (processes.id) holding a claim.
CREATE TABLE queue (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('inbound', 'outbound')),
    conversation_key TEXT NOT NULL,
    payload TEXT NOT NULL,
    author_id BIGINT,
    guild_id BIGINT,
    notice BOOLEAN NOT NULL DEFAULT FALSE,
    state TEXT NOT NULL CHECK (state IN ('pending', 'claimed', 'done', 'dead', 'expired')),
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at DOUBLE PRECISION NOT NULL,
    next_attempt_at DOUBLE PRECISION NOT NULL,
    lease_until DOUBLE PRECISION,
    claimed_by BIGINT,
    last_error TEXT,
    dedup_key TEXT UNIQUE,
    finished_at DOUBLE PRECISION
);
-- Live items by conversation: the heads a claim may take, and "is an older item live".
CREATE INDEX queue_live ON queue (conversation_key, id) WHERE state IN ('pending', 'claimed');
CREATE INDEX queue_pending ON queue (id) WHERE state = 'pending';
CREATE INDEX queue_claimed ON queue (lease_until) WHERE state = 'claimed';
CREATE INDEX queue_pending_by_author ON queue (author_id) WHERE state = 'pending' AND kind = 'inbound';
CREATE INDEX queue_pending_by_guild ON queue (guild_id) WHERE state = 'pending' AND kind = 'inbound';
CREATE INDEX queue_finished ON queue (state, finished_at) WHERE state IN ('done', 'dead', 'expired');

CREATE TABLE processed (
    message_id TEXT PRIMARY KEY,
    processed_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX processed_by_time ON processed (processed_at);

CREATE TABLE events (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind TEXT NOT NULL,
    data TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX events_by_kind ON events (kind, id);

CREATE TABLE incidents (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind TEXT NOT NULL,
    dependency TEXT NOT NULL,
    cause TEXT NOT NULL,
    started_at DOUBLE PRECISION NOT NULL,
    ended_at DOUBLE PRECISION,
    settled_at DOUBLE PRECISION,
    queued INTEGER NOT NULL DEFAULT 0,
    answered_after INTEGER NOT NULL DEFAULT 0,
    dead_lettered INTEGER NOT NULL DEFAULT 0,
    note TEXT,
    process_id BIGINT  -- the process that opened it; its start-up never closes another live one's
);
CREATE INDEX incidents_by_dependency ON incidents (dependency, started_at);

-- Availability per UTC day of acceptance, kept by triggers in the transaction of each change (as
-- in SQLite). The migration tool sets bot.importing so that copied rows are not counted twice.
CREATE TABLE availability (
    day INTEGER PRIMARY KEY,
    accepted INTEGER NOT NULL DEFAULT 0,
    answered INTEGER NOT NULL DEFAULT 0,
    answered_in_time INTEGER NOT NULL DEFAULT 0
);

CREATE FUNCTION availability_accepted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.kind = 'inbound' AND current_setting('bot.importing', true) IS DISTINCT FROM 'on' THEN
        INSERT INTO availability (day, accepted) VALUES (floor(NEW.created_at / 86400)::integer, 1)
        ON CONFLICT (day) DO UPDATE SET accepted = availability.accepted + 1;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER availability_accepted AFTER INSERT ON queue
    FOR EACH ROW EXECUTE FUNCTION availability_accepted();

CREATE FUNCTION availability_answered() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    in_time INTEGER := CASE WHEN NEW.finished_at - NEW.created_at <= 30 THEN 1 ELSE 0 END;
BEGIN
    IF NEW.state = 'done' AND OLD.state <> 'done' AND NOT NEW.notice THEN
        INSERT INTO availability (day, answered, answered_in_time)
        VALUES (floor(NEW.created_at / 86400)::integer, 1, in_time)
        ON CONFLICT (day) DO UPDATE SET answered = availability.answered + 1,
            answered_in_time = availability.answered_in_time + EXCLUDED.answered_in_time;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER availability_answered AFTER UPDATE OF state ON queue
    FOR EACH ROW EXECUTE FUNCTION availability_answered();

CREATE TABLE alerts (
    key TEXT PRIMARY KEY,
    detail TEXT NOT NULL,
    since DOUBLE PRECISION NOT NULL,
    notified_at DOUBLE PRECISION,
    resolved_at DOUBLE PRECISION
);

CREATE TABLE attachment_refs (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    conversation_key TEXT NOT NULL,
    message_id TEXT NOT NULL,
    data TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX attachment_refs_by_key ON attachment_refs (conversation_key, id);
CREATE INDEX attachment_refs_by_time ON attachment_refs (created_at);

CREATE TABLE token_usage (
    day INTEGER NOT NULL,
    user_id BIGINT NOT NULL,
    guild_id BIGINT NOT NULL,
    model TEXT NOT NULL,
    calls BIGINT NOT NULL DEFAULT 0,
    prompt_tokens BIGINT NOT NULL DEFAULT 0,
    output_tokens BIGINT NOT NULL DEFAULT 0,
    thought_tokens BIGINT NOT NULL DEFAULT 0,
    cached_tokens BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (day, user_id, guild_id, model)
);
CREATE INDEX token_usage_by_guild ON token_usage (day, guild_id);
