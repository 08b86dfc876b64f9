-- Semantic memory (services/memory_store.py): what was said, its embedding, and who may recall it.
-- scope 'user': recalled for owner_id (a user who turned /memory on); scope 'guild': recalled for
-- anyone in guild owner_id (a server whose managers turned the memory setting on). author_id is who
-- said it: /memory forget deletes every row a user authored, in both scopes.
CREATE TABLE memories (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    scope TEXT NOT NULL CHECK (scope IN ('user', 'guild')),
    owner_id INTEGER NOT NULL,
    author_id INTEGER NOT NULL,
    guild_id INTEGER,
    text TEXT NOT NULL,
    answer TEXT NOT NULL DEFAULT '',
    model TEXT NOT NULL,
    vector BLOB NOT NULL,
    said_at REAL NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX memories_by_owner ON memories (scope, owner_id, id);
CREATE INDEX memories_by_author ON memories (author_id);
-- Users' choices: enabled (1: /memory on), and when they last said /memory forget (nothing said
-- before then is stored afterwards, even when its embedding was still on its way).
CREATE TABLE memory_users (
    user_id INTEGER PRIMARY KEY,
    enabled INTEGER NOT NULL DEFAULT 0,
    forgot_at REAL NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL
);
-- The same for a server's memory (its managers' /memory forget scope:server).
CREATE TABLE memory_guilds (
    guild_id INTEGER PRIMARY KEY,
    forgot_at REAL NOT NULL DEFAULT 0
);
