-- Version 3: conversations (bot/conversations.py), as SQLite's migration 6.
-- Who said a user turn (a label such as "Bob (<@123>)", so Gemini can tell the people of a channel
-- apart), and the turns by the id of the message they came from, so a reply to an earlier answer
-- finds that answer's conversation and continues it as a branch of its own.
ALTER TABLE turns ADD COLUMN speaker TEXT;
CREATE INDEX turns_by_message ON turns (message_id, id) WHERE message_id IS NOT NULL;
